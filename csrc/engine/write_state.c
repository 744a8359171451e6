/*
 * The state of a read-write handle (QEMU's qcow2_do_open/qcow2_close write
 * side): runtime options, autoclear bits, persistent bitmaps marked in
 * use, the dirty bit of lazy refcounts (set before the first deferred
 * update, cleared on a clean close), repair of a dirty image at open;
 * flush, raw file access and the write trace.
 */
#include <stdlib.h>
#include <string.h>

#include "cluster.h"
#include "write.h"

/* Autoclear bits this engine keeps consistent (bitmaps: by marking them
 * in use, see mark_bitmaps_in_use). */
#define AUTOCLEAR_KNOWN  (AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW)

/* ---- Guards ----------------------------------------------------------------- */

int qcow2_check_writable(qcow2_image *img)
{
    if (img->read_only || !img->ws || img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_READONLY, "image is open read-only");
    if (img->ws->poisoned) {
        img->err = img->ws->poison;
        return img->ws->poison.code;
    }
    return 0;
}

/* Lazy refcounts: the dirty bit reaches the disk before any refcount
 * update may lag behind its L2 entry (QEMU's qcow2_mark_dirty). */
static int mark_dirty(qcow2_image *img)
{
    int rc;

    if (img->ws->dirty_on_disk ||
        (img->hdr.incompatible_features & INCOMPAT_DIRTY)) {
        img->ws->dirty_on_disk = 1;
        return 0;
    }
    rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_feature(img, 0, 0, 1);
    if (rc == 0)
        img->ws->dirty_on_disk = 1;
    return rc;
}

int qcow2_begin_update(qcow2_image *img)
{
    int rc = qcow2_check_writable(img);

    if (rc < 0 || img->is_raw || !img->ws->lazy_refcounts)
        return rc;
    return mark_dirty(img);
}

/* ---- Persistent bitmaps ------------------------------------------------- */

/*
 * Guest writes would make the bitmaps stale: flag every one in use, as
 * QEMU does on a read-write open (it clears the flag when it stores them
 * at close; this engine does not track dirty regions, so they stay in use
 * and QEMU reports them inconsistent rather than trusting them). A
 * directory that cannot be walked loses autoclear bit 0 instead.
 */
static int mark_bitmaps_in_use(qcow2_image *img)
{
    uint64_t size = img->ext.bitmap_directory_size;
    uint64_t offset = img->ext.bitmap_directory_offset;
    uint8_t *dir;
    int rc, changed = 0;

    if (!img->ext.has_bitmaps ||
        !(img->hdr.autoclear_features & AUTOCLEAR_BITMAPS))
        return 0;
    if (size == 0 || size > (64u << 20))
        return qcow2_header_set_feature(img, 2, 0, 0);
    dir = malloc((size_t)size);
    if (!dir)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    rc = qcow2_read_meta(img, offset, dir, (size_t)size, "bitmap directory");
    for (uint64_t at = 0; rc == 0 && at + 24 <= size;) {
        uint32_t flags = be32(dir + at + 12);
        uint64_t entry = align_up(24 + (uint64_t)be32(dir + at + 20) +
                                  be16(dir + at + 18), 8);
        if (!(flags & 1)) {
            put_be32(dir + at + 12, flags | 1);
            changed = 1;
        }
        at += entry;
    }
    if (rc == 0 && changed)
        rc = qcow2_write_checked(img, OVERLAP_BITMAP_DIR, "bitmap_directory",
                                 offset, dir, (size_t)size);
    if (rc == 0 && changed)
        rc = qcow2_barrier(img);
    free(dir);
    return rc;
}

/* ---- Repair of a dirty image --------------------------------------------- */

/* Host-cluster reference counts computed from the metadata. */
typedef struct ref_tally {
    uint32_t *counts;
    uint64_t clusters;
} ref_tally;

static int tally_range(qcow2_image *img, ref_tally *t, uint64_t offset,
                       uint64_t length)
{
    uint64_t first, last;

    if (length == 0)
        return 0;
    first = offset >> img->cluster_bits;
    last = (offset + length - 1) >> img->cluster_bits;
    if (last > (QCOW2_MAX_HOST_OFFSET >> img->cluster_bits))
        return qcow2_fail(img, QCOW2_E_CORRUPT, "reference to 0x%llx past "
                          "the largest host offset",
                          (unsigned long long)offset);
    if (last >= t->clusters) {
        uint64_t grown = max_u64(last + 1, t->clusters * 2);
        uint32_t *counts = realloc(t->counts, grown * sizeof *counts);
        if (!counts)
            return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        memset(counts + t->clusters, 0,
               (grown - t->clusters) * sizeof *counts);
        t->counts = counts;
        t->clusters = grown;
    }
    for (uint64_t c = first; c <= last; c++)
        if (t->counts[c] < UINT32_MAX)
            t->counts[c]++;
    return 0;
}

/* An L2 table and everything it references, once per L1 that holds it. */
static int tally_l2(qcow2_image *img, ref_tally *t, uint64_t l2_offset,
                    uint8_t *table)
{
    int rc = tally_range(img, t, l2_offset, img->cluster_size);

    if (rc == 0)
        rc = qcow2_read_meta(img, l2_offset, table, img->cluster_size,
                             "L2 table");
    for (uint64_t i = 0; rc == 0 && i < img->l2_entries; i++) {
        uint64_t entry = be64(table + i * img->l2_entry_bytes);
        if (entry & QCOW_OFLAG_COMPRESSED) {
            uint32_t x = 70 - img->cluster_bits;
            uint64_t coffset = entry & ((1ull << x) - 1);
            uint64_t sectors = ((entry >> x) &
                                ((1ull << (img->cluster_bits - 8)) - 1)) + 1;
            rc = tally_range(img, t, coffset & ~511ull, sectors * 512);
        } else if ((entry & L2E_OFFSET_MASK) && !qcow2_has_data_file(img)) {
            rc = tally_range(img, t, entry & L2E_OFFSET_MASK,
                             img->cluster_size);
        }
    }
    return rc;
}

static int tally_l1(qcow2_image *img, ref_tally *t, const uint64_t *l1,
                    uint32_t size, uint64_t l1_offset, uint8_t *table)
{
    int rc = tally_range(img, t, l1_offset, (uint64_t)size * 8);

    for (uint32_t i = 0; rc == 0 && i < size; i++) {
        uint64_t l2_offset = l1[i] & L1E_OFFSET_MASK;
        if (l2_offset)
            rc = tally_l2(img, t, l2_offset, table);
    }
    return rc;
}

static int tally_metadata(qcow2_image *img, ref_tally *t, uint8_t *table)
{
    const qcow2_header *h = &img->hdr;
    int rc = tally_range(img, t, 0, img->cluster_size);

    if (rc == 0)
        rc = tally_range(img, t, h->refcount_table_offset,
                         (uint64_t)h->refcount_table_clusters *
                         img->cluster_size);
    for (uint64_t i = 0; rc == 0 && i < img->reftable_entries; i++)
        if (img->reftable[i] & REFT_OFFSET_MASK)
            rc = tally_range(img, t, img->reftable[i] & REFT_OFFSET_MASK,
                             img->cluster_size);
    if (rc == 0 && img->ext.has_crypto_header)
        rc = tally_range(img, t, img->ext.crypto_header_offset,
                         img->ext.crypto_header_length);
    if (rc == 0)
        rc = tally_l1(img, t, img->l1, img->l1_size, h->l1_table_offset,
                      table);
    for (uint32_t s = 0; rc == 0 && s < img->nb_snapshots; s++) {
        const qcow2_snapshot *sn = &img->snapshots[s];
        uint64_t *l1 = NULL;
        rc = tally_range(img, t, sn->entry_offset, sn->entry_length);
        if (rc == 0)
            rc = qcow2_l1_load(img, sn->l1_table_offset, sn->l1_size,
                               "snapshot L1 table", &l1);
        if (rc == 0)
            rc = tally_l1(img, t, l1, sn->l1_size, sn->l1_table_offset,
                          table);
        free(l1);
    }
    return rc;
}

/*
 * What a crashed writer with lazy refcounts leaves: refcounts lower than
 * the references. Every one found is raised; too-high refcounts (leaks)
 * stay. New refcount blocks go past the end of the file, where nothing
 * the metadata references can be.
 */
static int raise_refcounts(qcow2_image *img)
{
    ref_tally t = { NULL, 0 };
    uint64_t file_size;
    uint8_t *table = malloc(img->cluster_size);
    int rc = table ? 0 : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");

    if (rc == 0)
        rc = tally_metadata(img, &t, table);
    if (rc == 0)
        rc = img->io->ops->size(img->io, &file_size);
    if (rc == 0)
        img->ws->free_cluster_hint =
            max_u64(div_round_up(file_size, img->cluster_size), t.clusters);
    for (uint64_t c = 0; rc == 0 && c < t.clusters; c++) {
        uint64_t refcount;
        if (t.counts[c] == 0)
            continue;
        rc = qcow2_refcount_get(img, c, &refcount);
        if (rc == 0 && refcount < t.counts[c])
            rc = qcow2_refcount_update(img, c << img->cluster_bits,
                                       img->cluster_size,
                                       (int64_t)(t.counts[c] - refcount));
    }
    img->ws->free_cluster_hint = 0;
    free(t.counts);
    free(table);
    return rc;
}

static int repair_dirty(qcow2_image *img)
{
    int rc = raise_refcounts(img);

    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_feature(img, 0, 0, 0);
    if (rc < 0)
        return qcow2_fail(img, rc, "cannot repair the dirty image: %s",
                          img->err.msg);
    return 0;
}

/* ---- Open and close ---------------------------------------------------------- */

static int overlap_mask(int mode)
{
    switch (mode) {
    case 0:  return 0;
    case 1:  return OVERLAP_CONSTANT;
    case 3:  return OVERLAP_ALL;
    default: return OVERLAP_CACHED;
    }
}

static int set_options(qcow2_image *img, const qcow2_open_opts *opts)
{
    qcow2_write_state *ws = img->ws;
    int lazy = opts->lazy_refcounts;

    ws->overlap_checks = overlap_mask(opts->overlap_check);
    ws->discard_passthrough = opts->discard != 0;
    if (lazy < 0)
        lazy = (img->hdr.compatible_features & COMPAT_LAZY_REFCOUNTS) != 0;
    if (lazy && img->hdr.version < 3)
        return qcow2_fail(img, QCOW2_E_INVALID, "Lazy refcounts require a "
                          "qcow2 image with at least qemu 1.1 "
                          "compatibility level");
    ws->lazy_refcounts = lazy != 0;
    return 0;
}

int qcow2_write_state_init(qcow2_image *img, const qcow2_open_opts *opts)
{
    uint64_t incompat = img->hdr.incompatible_features;
    int rc;

    if (!img->ws) {
        img->ws = malloc(sizeof *img->ws);
        if (!img->ws)
            return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        qcow2_write_state_defaults(img->ws);
    }
    if (img->is_raw)
        return 0;
    rc = set_options(img, opts);
    if (rc < 0)
        return rc;
    if ((incompat & INCOMPAT_CORRUPT) && !opts->repair)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "image is corrupt; open "
                          "read-only or with repair");
    if (img->hdr.version >= 3 &&
        (img->hdr.autoclear_features & ~AUTOCLEAR_KNOWN)) {
        /* Before the first change: whatever they vouched for, this
         * writer does not keep up to date. One synced 8-byte write. */
        uint8_t bytes[8];
        put_be64(bytes, img->hdr.autoclear_features & AUTOCLEAR_KNOWN);
        rc = qcow2_write_checked(img, OVERLAP_HEADER, "header", 88, bytes,
                                 sizeof bytes);
        if (rc == 0)
            rc = qcow2_barrier(img);
        if (rc == 0)
            img->hdr.autoclear_features &= AUTOCLEAR_KNOWN;
        if (rc < 0)
            return rc;
    }
    rc = mark_bitmaps_in_use(img);
    if (rc < 0)
        return rc;
    if ((incompat & INCOMPAT_DIRTY) && !opts->repair)
        return repair_dirty(img);
    return 0;
}

int qcow2_write_state_close(qcow2_image *img)
{
    qcow2_write_state *ws = img->ws;
    int rc = 0;

    if (!ws)
        return 0;
    if (!ws->poisoned && !img->is_raw) {
        rc = qcow2_barrier(img);
        /* Refcounts are never deferred here, so once everything is on
         * disk the image is clean. */
        if (rc == 0 && ws->dirty_on_disk &&
            (img->hdr.incompatible_features & INCOMPAT_DIRTY))
            rc = qcow2_header_set_feature(img, 0, 0, 0);
    } else if (img->is_raw) {
        rc = qcow2_barrier(img);
    }
    free(ws);
    img->ws = NULL;
    return rc;
}

/* ---- Flush, raw access, trace -------------------------------------------- */

int qcow2_flush(qcow2_image *img)
{
    int rc = qcow2_check_writable(img);

    return rc < 0 ? rc : qcow2_barrier(img);
}

int qcow2_raw_read(qcow2_image *img, uint64_t offset, void *buf,
                   size_t length, size_t *done)
{
    size_t got = 0;

    while (got < length) {
        int64_t n = img->io->ops->pread(img->io, (uint8_t *)buf + got,
                                        length - got, offset + got);
        if (n < 0) {
            if (done)
                *done = got;
            return qcow2_fail(img, (int)n, "raw read of %zu bytes at 0x%llx "
                              "failed", length - got,
                              (unsigned long long)(offset + got));
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    if (done)
        *done = got;
    return 0;
}

int qcow2_raw_write(qcow2_image *img, uint64_t offset, const void *buf,
                    size_t length)
{
    int rc;

    if (img->read_only || !img->ws || img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_READONLY, "image is open read-only");
    if (!range_inside(offset, length, QCOW2_MAX_HOST_OFFSET + 1))
        return qcow2_fail(img, QCOW2_E_INVALID, "raw write past the largest "
                          "host offset");
    /* Deliberately past the overlap check: tests poke metadata. */
    qcow2_io_set_label(img->io, "raw");
    rc = img->io->ops->pwrite(img->io, buf, length, offset);
    if (rc < 0)
        return qcow2_fail(img, rc, "raw write of %zu bytes at 0x%llx failed",
                          length, (unsigned long long)offset);
    /* Whatever was cached may be what was just overwritten. */
    qcow2_l2_cache_drop_all(img->l2_cache);
    if (img->codec)
        qcow2_codec_forget(img->codec);
    return 0;
}

size_t qcow2_io_log_count(const qcow2_image *img)
{
    return img ? qcow2_io_trace_count(img->io) : 0;
}

int qcow2_io_log_at(const qcow2_image *img, size_t index,
                    qcow2_io_record *out)
{
    const qcow2_io_trace_entry *e = img ? qcow2_io_trace_at(img->io, index)
                                        : NULL;

    if (!e)
        return QCOW2_E_INVALID;
    out->offset = e->offset;
    out->length = e->length;
    out->what = e->what;
    return 0;
}
