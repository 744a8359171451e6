/*
 * The last line of defence of every write: the metadata overlap check
 * (QEMU's qcow2_check_metadata_overlap), the checked write every engine
 * write goes through, barriers, and poisoning of a handle whose metadata
 * update broke off midway.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "overlap.h"

/* QEMU's metadata_ol_names, so messages read the same. */
static const char *overlap_name(int which)
{
    switch (which) {
    case OVERLAP_HEADER:            return "qcow2_header";
    case OVERLAP_ACTIVE_L1:         return "active L1 table";
    case OVERLAP_ACTIVE_L2:         return "active L2 table";
    case OVERLAP_REFCOUNT_TABLE:    return "refcount table";
    case OVERLAP_REFCOUNT_BLOCK:    return "refcount block";
    case OVERLAP_SNAPSHOT_TABLE:    return "snapshot table";
    case OVERLAP_INACTIVE_L1:       return "inactive L1 table";
    case OVERLAP_INACTIVE_L2:       return "inactive L2 table";
    case OVERLAP_BITMAP_DIR:        return "bitmap directory";
    case OVERLAP_CRYPTO_HEADER:     return "encryption header";
    default:                        return "metadata";
    }
}

/* The byte length of a table of `entries` 8-byte entries, saturated so a
 * hostile count cannot wrap (the range then simply covers everything). */
static uint64_t table_bytes(uint64_t entries)
{
    uint64_t bytes;
    return mul_overflows(entries, 8, &bytes) ? UINT64_MAX : bytes;
}

/* Does [offset, offset+length) (cluster aligned) hit [start, start+len)? */
static int hits(uint64_t offset, uint64_t length, uint64_t start,
                uint64_t len)
{
    uint64_t room = UINT64_MAX - start;
    if (len > room)
        len = room;              /* saturate: never wrap */
    return ranges_overlap(offset, length, start, len);
}

/* Every entry of an L1 table (host order) as one-cluster L2 tables. */
static int l1_hits(const qcow2_image *img, const uint64_t *l1, uint32_t size,
                   uint64_t offset, uint64_t length)
{
    for (uint32_t i = 0; i < size; i++) {
        uint64_t l2_offset = l1[i] & L1E_OFFSET_MASK;
        if (l2_offset && hits(offset, length, l2_offset, img->cluster_size))
            return 1;
    }
    return 0;
}

/* ---- Sorted indexes of the tables' offsets (held by check -r all) -------- */

/* The distinct nonzero offsets one in-memory table lists, sorted, with a
 * Fenwick tree of how many entries list each: entries that change only
 * move counts (O(log n)); an offset not indexed yet means a rebuild. */
typedef struct offset_index {
    const uint64_t *table;       /* the table indexed, as last seen */
    uint64_t entries, table_offset, mask;
    uint64_t *shadow;            /* its entries as indexed */
    uint64_t *keys;              /* distinct offsets, ascending */
    uint32_t *tree;              /* Fenwick tree over keys, 1-based */
    uint64_t nkeys;
    uint64_t dirty_lo, dirty_hi; /* entries written since, [lo, hi) */
    int stale;                   /* rebuild before the next search */
} offset_index;

struct qcow2_overlap_index {
    int holds;
    offset_index l2, refblocks;
};

static void index_free(offset_index *x)
{
    free(x->shadow);
    free(x->keys);
    free(x->tree);
    x->shadow = x->keys = NULL;
    x->tree = NULL;
    x->nkeys = 0;
    x->stale = 1;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void tree_add(offset_index *x, uint64_t pos, int32_t delta)
{
    for (uint64_t i = pos + 1; i <= x->nkeys; i += i & (~i + 1))
        x->tree[i - 1] += (uint32_t)delta;
}

/* Live entries listing keys[0 .. n). */
static uint64_t tree_prefix(const offset_index *x, uint64_t n)
{
    uint64_t sum = 0;
    for (uint64_t i = n; i > 0; i -= i & (~i + 1))
        sum += x->tree[i - 1];
    return sum;
}

/* Position of `key` in keys, or nkeys when absent. */
static uint64_t key_find(const offset_index *x, uint64_t key)
{
    uint64_t lo = 0, hi = x->nkeys;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (x->keys[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < x->nkeys && x->keys[lo] == key ? lo : x->nkeys;
}

static int index_build(offset_index *x, const uint64_t *table,
                       uint64_t entries, uint64_t table_offset, uint64_t mask)
{
    uint64_t n = 0, *sorted;

    index_free(x);
    x->table = table;
    x->entries = entries;
    x->table_offset = table_offset;
    x->mask = mask;
    x->dirty_lo = x->dirty_hi = 0;
    if (entries > SIZE_MAX / 8 || entries >= UINT32_MAX)
        return -1;
    x->shadow = malloc((size_t)entries * 8 + 8);
    sorted = malloc((size_t)entries * 8 + 8);
    if (!x->shadow || !sorted) {
        free(sorted);
        index_free(x);
        return -1;
    }
    memcpy(x->shadow, table, (size_t)entries * 8);
    for (uint64_t i = 0; i < entries; i++)
        if (table[i] & mask)
            sorted[n++] = table[i] & mask;
    qsort(sorted, (size_t)n, 8, cmp_u64);
    x->tree = calloc((size_t)n + 1, sizeof *x->tree);
    if (!x->tree) {
        free(sorted);
        index_free(x);
        return -1;
    }
    x->keys = sorted;
    for (uint64_t i = 0; i < n; i++) {
        if (x->nkeys && x->keys[x->nkeys - 1] == sorted[i]) {
            x->tree[x->nkeys - 1]++;
            continue;
        }
        x->keys[x->nkeys] = sorted[i];
        x->tree[x->nkeys++] = 1;
    }
    /* counts into a Fenwick tree in place, O(n) */
    for (uint64_t i = 1; i <= x->nkeys; i++) {
        uint64_t parent = i + (i & (~i + 1));
        if (parent <= x->nkeys)
            x->tree[parent - 1] += x->tree[i - 1];
    }
    x->stale = 0;
    return 0;
}

/* Bring the index up to the table: rebuilt when the table moved or was
 * replaced, entries written since the last search re-read. -1 when it
 * cannot be had (no memory): the caller scans. */
static int index_follow(offset_index *x, const uint64_t *table,
                        uint64_t entries, uint64_t table_offset,
                        uint64_t mask)
{
    if (x->stale || x->table != table || x->entries != entries ||
        x->table_offset != table_offset)
        return index_build(x, table, entries, table_offset, mask);
    for (uint64_t i = x->dirty_lo; i < x->dirty_hi; i++) {
        uint64_t was = x->shadow[i] & mask, now = table[i] & mask, pos;
        if (was == now)
            continue;
        if (now) {
            pos = key_find(x, now);
            if (pos == x->nkeys)        /* an offset new to the index */
                return index_build(x, table, entries, table_offset, mask);
            tree_add(x, pos, 1);
        }
        if (was)
            tree_add(x, key_find(x, was), -1);
        x->shadow[i] = table[i];
    }
    x->dirty_lo = x->dirty_hi = 0;
    return 0;
}

/* Does any listed offset, as a one-cluster structure, hit the cluster-
 * aligned [offset, offset+length)? The same verdict as the scan. */
static int index_hits(const offset_index *x, uint64_t cs, uint64_t offset,
                      uint64_t length)
{
    uint64_t lo = 0, hi = x->nkeys, first, last;

    /* first key whose cluster (saturated, as hits() saturates) ends
     * past offset */
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2, key = x->keys[mid];
        if ((key > UINT64_MAX - cs ? UINT64_MAX : key + cs) > offset)
            hi = mid;
        else
            lo = mid + 1;
    }
    first = lo;
    /* first key at or past the end (offset + length cannot wrap here) */
    hi = x->nkeys;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (x->keys[mid] >= offset + length)
            hi = mid;
        else
            lo = mid + 1;
    }
    last = lo;
    return last > first && tree_prefix(x, last) > tree_prefix(x, first);
}

/* A write over a table's bytes changes entries the index must re-read;
 * one over the header may move or replace any table. */
static void index_note_write(offset_index *x, uint64_t cs, uint64_t offset,
                             uint64_t length)
{
    uint64_t end, lo, hi;

    if (x->stale)
        return;
    if (offset < cs || add_overflows(offset, length, &end)) {
        x->stale = 1;
        return;
    }
    if (!ranges_overlap(offset, length, x->table_offset, x->entries * 8))
        return;
    lo = (max_u64(offset, x->table_offset) - x->table_offset) / 8;
    hi = div_round_up(min_u64(end, x->table_offset + x->entries * 8) -
                      x->table_offset, 8);
    if (x->dirty_hi > x->dirty_lo) {
        lo = min_u64(lo, x->dirty_lo);
        hi = max_u64(hi, x->dirty_hi);
    }
    x->dirty_lo = lo;
    x->dirty_hi = hi;
}

void qcow2_overlap_index_hold(qcow2_image *img)
{
    struct qcow2_overlap_index *index;

    if (!img->ws)
        return;
    if (img->ws->index) {
        img->ws->index->holds++;
        return;
    }
    index = calloc(1, sizeof *index);
    if (!index)
        return;                 /* the check scans instead */
    index->holds = 1;
    index->l2.stale = index->refblocks.stale = 1;
    img->ws->index = index;
}

void qcow2_overlap_index_release(qcow2_image *img)
{
    struct qcow2_overlap_index *index = img->ws ? img->ws->index : NULL;

    if (!index || --index->holds > 0)
        return;
    index_free(&index->l2);
    index_free(&index->refblocks);
    free(index);
    img->ws->index = NULL;
}

static int active_l2_hits(qcow2_image *img, uint64_t offset, uint64_t length)
{
    struct qcow2_overlap_index *index = img->ws ? img->ws->index : NULL;

    if (index && index_follow(&index->l2, img->l1, img->l1_size,
                              img->hdr.l1_table_offset,
                              L1E_OFFSET_MASK) == 0)
        return index_hits(&index->l2, img->cluster_size, offset, length);
    return l1_hits(img, img->l1, img->l1_size, offset, length);
}

static int refblock_hits(qcow2_image *img, uint64_t offset, uint64_t length)
{
    struct qcow2_overlap_index *index = img->ws ? img->ws->index : NULL;

    if (index && index_follow(&index->refblocks, img->reftable,
                              img->reftable_entries,
                              img->hdr.refcount_table_offset,
                              REFT_OFFSET_MASK) == 0)
        return index_hits(&index->refblocks, img->cluster_size, offset,
                          length);
    for (uint64_t i = 0; i < img->reftable_entries; i++) {
        uint64_t block = img->reftable[i] & REFT_OFFSET_MASK;
        if (block && hits(offset, length, block, img->cluster_size))
            return 1;
    }
    return 0;
}

static uint64_t snapshot_table_bytes(const qcow2_image *img)
{
    uint64_t end = img->hdr.snapshots_offset;
    for (uint32_t i = 0; i < img->nb_snapshots; i++) {
        uint64_t entry_end;
        const qcow2_snapshot *sn = &img->snapshots[i];
        if (add_overflows(sn->entry_offset, sn->entry_length, &entry_end))
            return UINT64_MAX;
        end = max_u64(end, entry_end);
    }
    return end - img->hdr.snapshots_offset;
}

/* Inactive L2 tables: only with overlap_check "all", reading every
 * snapshot L1 from the file (QEMU does the same). A read failure counts
 * as no hit: the check is a guard, not a validator. */
static int inactive_l2_hits(qcow2_image *img, uint64_t offset,
                            uint64_t length)
{
    for (uint32_t i = 0; i < img->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &img->snapshots[i];
        uint64_t *l1;
        int hit;

        if (sn->l1_size == 0 || sn->l1_size > QCOW2_MAX_L1_BYTES / 8)
            continue;
        l1 = malloc((size_t)sn->l1_size * 8);
        if (!l1)
            continue;
        if (qcow2_read_meta(img, sn->l1_table_offset, l1,
                            (size_t)sn->l1_size * 8, "snapshot L1 table")) {
            free(l1);
            continue;
        }
        for (uint32_t j = 0; j < sn->l1_size; j++)
            l1[j] = be64(&l1[j]);
        hit = l1_hits(img, l1, sn->l1_size, offset, length);
        free(l1);
        if (hit)
            return 1;
    }
    return 0;
}

/* The first structure in `checks` that [offset, offset+length) hits, or
 * 0. The range is widened to whole clusters, as QEMU widens it: a write
 * into a metadata cluster's slack is still a write into that cluster. */
static int first_overlap(qcow2_image *img, int checks, uint64_t offset,
                         uint64_t length)
{
    const qcow2_header *h = &img->hdr;
    uint64_t cs = img->cluster_size;
    uint64_t end;

    if (length == 0)
        return 0;
    if (add_overflows(offset, length, &end) || end > UINT64_MAX - cs)
        return OVERLAP_HEADER;   /* absurd range: refuse it */
    offset &= ~(cs - 1);
    length = align_up(end, cs) - offset;

    if ((checks & OVERLAP_HEADER) && offset < cs)
        return OVERLAP_HEADER;
    if ((checks & OVERLAP_ACTIVE_L1) && img->l1_size &&
        hits(offset, length, h->l1_table_offset, table_bytes(img->l1_size)))
        return OVERLAP_ACTIVE_L1;
    if ((checks & OVERLAP_REFCOUNT_TABLE) && h->refcount_table_clusters &&
        hits(offset, length, h->refcount_table_offset,
             (uint64_t)h->refcount_table_clusters * cs))
        return OVERLAP_REFCOUNT_TABLE;
    if ((checks & OVERLAP_SNAPSHOT_TABLE) && img->nb_snapshots &&
        hits(offset, length, h->snapshots_offset, snapshot_table_bytes(img)))
        return OVERLAP_SNAPSHOT_TABLE;
    if (checks & OVERLAP_INACTIVE_L1) {
        for (uint32_t i = 0; i < img->nb_snapshots; i++) {
            const qcow2_snapshot *sn = &img->snapshots[i];
            if (sn->l1_size && hits(offset, length, sn->l1_table_offset,
                                    table_bytes(sn->l1_size)))
                return OVERLAP_INACTIVE_L1;
        }
    }
    if ((checks & OVERLAP_CRYPTO_HEADER) && img->ext.has_crypto_header &&
        hits(offset, length, img->ext.crypto_header_offset,
             img->ext.crypto_header_length))
        return OVERLAP_CRYPTO_HEADER;
    if ((checks & OVERLAP_BITMAP_DIR) && img->ext.has_bitmaps &&
        hits(offset, length, img->ext.bitmap_directory_offset,
             img->ext.bitmap_directory_size))
        return OVERLAP_BITMAP_DIR;
    if ((checks & OVERLAP_ACTIVE_L2) && img->l1 &&
        active_l2_hits(img, offset, length))
        return OVERLAP_ACTIVE_L2;
    if ((checks & OVERLAP_REFCOUNT_BLOCK) && img->reftable &&
        refblock_hits(img, offset, length))
        return OVERLAP_REFCOUNT_BLOCK;
    if ((checks & OVERLAP_INACTIVE_L2) && inactive_l2_hits(img, offset, length))
        return OVERLAP_INACTIVE_L2;
    return 0;
}

/* Set the corrupt bit with a direct write of the incompatible-features
 * field: bytes 72..79 are header whatever else claims them, and going
 * through qcow2_write_checked could meet the same bad metadata again and
 * recurse. The bit is set in memory first so nothing re-enters. */
static void mark_corrupt(qcow2_image *img)
{
    uint8_t field[8];

    img->hdr.incompatible_features |= INCOMPAT_CORRUPT;
    put_be64(field, img->hdr.incompatible_features);
    qcow2_io_set_label(img->io, "header");
    if (img->io->ops->pwrite(img->io, field, sizeof field, 72) == 0)
        (void)img->io->ops->flush(img->io);
}

int qcow2_overlap_find(qcow2_image *img, int ignore, uint64_t offset,
                       uint64_t length)
{
    return img->ws ? first_overlap(img, img->ws->overlap_checks & ~ignore,
                                   offset, length)
                   : 0;
}

int qcow2_overlap_check(qcow2_image *img, int ignore, uint64_t offset,
                        uint64_t length)
{
    int checks, which;
    char reason[160];

    if (!img->ws)
        return 0;
    checks = img->ws->overlap_checks & ~ignore;
    which = first_overlap(img, checks, offset, length);
    if (!which)
        return 0;

    snprintf(reason, sizeof reason,
             "Preventing invalid write on metadata (overlaps with %s)",
             overlap_name(which));
    /* Mark the file first so that a later open refuses to write it, as
     * QEMU's qcow2_signal_corruption does; v2 has no bit to set. */
    if (img->hdr.version >= 3 &&
        !(img->hdr.incompatible_features & INCOMPAT_CORRUPT) &&
        !img->ws->poisoned)
        mark_corrupt(img);
    qcow2_fail(img, QCOW2_E_CORRUPT, "%s: write at 0x%llx (%llu bytes)",
               reason, (unsigned long long)offset,
               (unsigned long long)length);
    return qcow2_poison(img, QCOW2_E_CORRUPT);
}

static int write_io(qcow2_image *img, qcow2_io *io, const char *what,
                    uint64_t offset, const void *buf, size_t length)
{
    int rc;

    qcow2_io_set_label(io, what);
    rc = io->ops->pwrite(io, buf, length, offset);
    if (rc < 0) {
        int sys_errno = io->last_errno;
        char text[128];
        return qcow2_fail(img, rc, "write of %s at 0x%llx (%zu bytes) "
                          "failed: %s", what, (unsigned long long)offset,
                          length, sys_errno ? qcow2_errno_text(sys_errno,
                                                  text, sizeof text)
                                            : qcow2_status_name(rc));
    }
    return 0;
}

int qcow2_write_checked(qcow2_image *img, int ignore, const char *what,
                        uint64_t offset, const void *buf, size_t length)
{
    int rc;

    if (img->ws && img->ws->poisoned) {
        img->err = img->ws->poison;
        return img->ws->poison.code;
    }
    if (!range_inside(offset, length, QCOW2_MAX_HOST_OFFSET + 1))
        return qcow2_fail(img, QCOW2_E_INVALID, "write of %s at 0x%llx "
                          "(%zu bytes) is past the largest host offset",
                          what, (unsigned long long)offset, length);
    rc = qcow2_overlap_check(img, ignore, offset, length);
    if (rc < 0)
        return rc;
    rc = write_io(img, img->io, what, offset, buf, length);
    if (img->ws && img->ws->index) {
        index_note_write(&img->ws->index->l2, img->cluster_size, offset,
                         length);
        index_note_write(&img->ws->index->refblocks, img->cluster_size,
                         offset, length);
    }
    /* The refcount-block cache, once it exists, observes every write:
     * cached blocks mirror the disk, whoever writes their bytes. */
    if (img->write_observer)
        img->write_observer(img->write_observer_ctx, offset, buf, length,
                            rc == 0);
    return rc;
}

int qcow2_write_data(qcow2_image *img, uint64_t offset, const void *buf,
                     size_t length)
{
    int rc;

    /* An external data file holds no metadata: nothing to overlap. */
    if (img->data_io && img->data_io != img->io) {
        if (img->ws && img->ws->poisoned) {
            img->err = img->ws->poison;
            return img->ws->poison.code;
        }
        rc = write_io(img, img->data_io, "data", offset, buf, length);
    } else {
        rc = qcow2_write_checked(img, 0, "data", offset, buf, length);
    }
    if (img->ws)
        img->ws->data_unsynced = 1;
    return rc;
}

static int flush_io(qcow2_image *img, qcow2_io *io, const char *which)
{
    int rc = io->ops->flush(io);
    if (rc < 0) {
        int sys_errno = io->last_errno;
        char text[128];
        return qcow2_fail(img, rc, "flush of the %s failed: %s", which,
                          sys_errno ? qcow2_errno_text(sys_errno, text,
                                                       sizeof text)
                                    : qcow2_status_name(rc));
    }
    return 0;
}

void *qcow2_spare_take(void **slot, size_t size)
{
    void *buf = slot ? *slot : NULL;

    if (!buf)
        return malloc(size);
    *slot = NULL;
    return buf;
}

void qcow2_spare_give(void **slot, void *buf)
{
    if (slot && !*slot)
        *slot = buf;
    else
        free(buf);
}

int qcow2_sync(qcow2_image *img)
{
    int rc;

    /* Unsafe cache mode: the caller gave up durability (a scratch output
     * that a crash makes useless anyway). */
    if (img->ws && img->ws->no_sync) {
        img->ws->data_unsynced = 0;
        return 0;
    }
    /* Data first: an L2 entry made durable by the image flush must not
     * point at data the data file has not made durable yet. */
    if (img->data_io && img->data_io != img->io) {
        rc = flush_io(img, img->data_io, "data file");
        if (rc < 0)
            return rc;
    }
    rc = flush_io(img, img->io, "image file");
    if (rc == 0 && img->ws) {
        img->ws->data_unsynced = 0;
        img->ws->syncs++;
    }
    return rc;
}

int qcow2_barrier(qcow2_image *img)
{
#ifdef QCOW2_TEST_NO_BARRIER
    /* Test-only variant (make nobarrier, build-nobarrier/): no ordering
     * between dependent writes, so that the power-cut sweeps can be seen
     * to fail. A normal build never defines it. */
    (void)img;
    return 0;
#else
    return qcow2_sync(img);
#endif
}

int qcow2_poison(qcow2_image *img, int code)
{
    /* The first failure is the one worth reporting: later calls repeat
     * it rather than describe their own refusal. */
    if (img->ws && !img->ws->poisoned) {
        img->ws->poisoned = 1;
        img->ws->poison = img->err;
        img->ws->poison.code = code;
    }
    return code;
}
