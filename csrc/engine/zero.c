/*
 * Zero writes and discards (QEMU's qcow2_co_pwrite_zeroes and
 * qcow2_co_pdiscard with zero_in_l2_slice / discard_in_l2_slice): whole
 * clusters change only their L2 entries, the entry first and the old
 * cluster's refcount after; partial clusters get explicit zeroes.
 */
#include <stdlib.h>
#include <string.h>

#include "write_path.h"

#define ZERO_CHUNK          (1u << 20)
#define BITMAP_ALL_ZEROES   0xffffffff00000000ull

/* ---- Explicit zeroes --------------------------------------------------------- */

static int write_explicit_zeroes(qcow2_image *img, uint64_t offset,
                                 uint64_t length)
{
    size_t chunk = (size_t)min_u64(length, ZERO_CHUNK);
    uint8_t *zeroes;
    int rc = 0;

    if (length == 0)
        return 0;
    zeroes = calloc(1, chunk);
    if (!zeroes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint64_t at = offset; at < offset + length && rc == 0; at += chunk)
        rc = qcow2_write(img, at, zeroes,
                         (size_t)min_u64(chunk, offset + length - at));
    free(zeroes);
    return rc;
}

/* 1 when the range already reads as zeroes with no data behind it: zero
 * (sub)clusters, or unallocated ones with nothing in a backing file. */
static int reads_as_zero(qcow2_image *img, uint64_t offset, uint64_t length,
                         int *yes)
{
    uint64_t end = offset + length;

    *yes = 1;
    for (uint64_t at = offset; at < end && *yes;) {
        qcow2_run run;
        int rc = qcow2_lookup_run(img, at, end - at, &run);
        if (rc < 0)
            return rc;
        if (run.type == SC_ZERO_PLAIN || run.type == SC_ZERO_ALLOC)
            ;
        else if (sc_type_is_unallocated(run.type))
            *yes = !img->backing || at >= img->backing->size;
        else
            *yes = 0;
        at += run.length;
    }
    return 0;
}

static int zero_partial(qcow2_image *img, uint64_t offset, uint64_t length)
{
    int yes, rc;

    if (length == 0)
        return 0;
    rc = reads_as_zero(img, offset, length, &yes);
    if (rc < 0 || yes)
        return rc;
    return write_explicit_zeroes(img, offset, length);
}

/* ---- Entries ------------------------------------------------------------------ */

/* What one L2 table's clusters of [start, end) become. */
typedef int (*entry_rule)(qcow2_image *img, const qcow2_l2_desc *old,
                          uint64_t from, uint64_t to, int unmap,
                          uint64_t *entry, uint64_t *bitmap, int *release);

/* Whole cluster: zero flag (or all-zero bitmap); allocated clusters are
 * let go with unmap, compressed ones always. Part of a cluster (extended
 * L2, whole subclusters): their zero bits set, alloc bits cleared. */
static int zero_rule(qcow2_image *img, const qcow2_l2_desc *old,
                     uint64_t from, uint64_t to, int unmap, uint64_t *entry,
                     uint64_t *bitmap, int *release)
{
    int whole = from == 0 && to == img->cluster_size;
    int raw = (img->hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW) != 0;

    if (!whole) {
        uint32_t bits = img->subcluster_bits;
        uint64_t mask = (2ull << ((to - 1) >> bits)) - (1ull << (from >> bits));
        *entry = old->entry;
        *bitmap = (old->bitmap | (mask << 32)) & ~mask;
        *release = 0;
        return 0;
    }
    /* A raw data file keeps its 1:1 mapping. */
    *release = old->compressed || (unmap && old->has_host && !raw);
    *entry = *release ? 0 : old->entry;
    *bitmap = old->bitmap;
    if (img->extended_l2)
        *bitmap = BITMAP_ALL_ZEROES;
    else
        *entry |= QCOW_OFLAG_ZERO;
    return 0;
}

/* v2 with unmap and no backing file: unallocated reads as zeroes. */
static int unallocate_rule(qcow2_image *img, const qcow2_l2_desc *old,
                           uint64_t from, uint64_t to, int unmap,
                           uint64_t *entry, uint64_t *bitmap, int *release)
{
    (void)img; (void)from; (void)to; (void)unmap;
    *release = old->compressed || old->has_host;
    *entry = 0;
    *bitmap = 0;
    return 0;
}

/* Discard: reads back as zeroes on v3 (zero flag when a backing file
 * would show through or something was allocated), unallocated on v2. */
static int discard_rule(qcow2_image *img, const qcow2_l2_desc *old,
                        uint64_t from, uint64_t to, int unmap,
                        uint64_t *entry, uint64_t *bitmap, int *release)
{
    int allocated = old->compressed || old->has_host;

    (void)from; (void)to; (void)unmap;
    *entry = old->entry;
    *bitmap = old->bitmap;
    *release = 0;
    if (!img->backing_name && !allocated)
        return 0;
    *release = allocated;
    *entry = 0;
    if (img->extended_l2)
        *bitmap = BITMAP_ALL_ZEROES;
    else if (img->hdr.version >= 3)
        *entry = QCOW_OFLAG_ZERO;
    return 0;
}

/* One L2 table's share of [start, end), cluster (or, for zero writes
 * with extended L2, subcluster) aligned. */
static int change_entries(qcow2_image *img, uint64_t start, uint64_t end,
                          int unmap, entry_rule rule)
{
    uint64_t cs = img->cluster_size;
    uint32_t l1_index = qcow2_l1_index(img, start);
    qcow2_l2_work work;
    int rc;

    /* Nothing mapped and nothing to hide: nothing to change. */
    if (rule == discard_rule && !img->backing_name &&
        (img->l1[l1_index] & L1E_OFFSET_MASK) == 0)
        return 0;
    rc = qcow2_l2_work_begin(img, l1_index, &work);
    for (uint64_t guest = start & ~(cs - 1); rc == 0 && guest < end;
         guest += cs) {
        uint64_t l2_index = qcow2_l2_index(img, guest);
        uint64_t from = max_u64(start, guest) - guest;
        uint64_t to = min_u64(end, guest + cs) - guest;
        uint64_t entry, bitmap;
        qcow2_l2_desc old;
        int release;

        rc = qcow2_l2_work_get(img, &work, l2_index, &old);
        if (rc == 0)
            rc = rule(img, &old, from, to, unmap, &entry, &bitmap, &release);
        if (rc < 0 || (entry == old.entry && bitmap == old.bitmap))
            continue;
        qcow2_l2_work_set(img, &work, l2_index, entry, bitmap);
        if (release)
            qcow2_l2_work_release(&work, old.entry);
    }
    if (rc == 0)
        rc = qcow2_l2_work_commit(img, &work);
    qcow2_l2_work_end(&work);
    return rc;
}

static int change_range(qcow2_image *img, uint64_t start, uint64_t end,
                        int unmap, entry_rule rule)
{
    uint64_t coverage = qcow2_l2_coverage(img);
    int rc = 0;

    for (uint64_t at = start; at < end && rc == 0;) {
        uint64_t stop = min_u64(end, (at / coverage + 1) * coverage);
        rc = change_entries(img, at, stop, unmap, rule);
        at = stop;
    }
    return rc;
}

/* ---- Zero writes ------------------------------------------------------------- */

static int check_range(qcow2_image *img, const char *what, uint64_t offset,
                       uint64_t length)
{
    int rc = qcow2_check_writable(img);

    if (rc == 0 && !range_inside(offset, length, img->size))
        rc = qcow2_fail(img, QCOW2_E_INVALID, "%s of %llu bytes at 0x%llx "
                        "is outside the disk (size 0x%llx)", what,
                        (unsigned long long)length,
                        (unsigned long long)offset,
                        (unsigned long long)img->size);
    return rc;
}

/* The disk's last, partial cluster counts as whole when the range runs
 * to the end of the disk (QEMU: "aligned, except at image end"). */
static uint64_t effective_end(const qcow2_image *img, uint64_t end)
{
    return end == img->size ? align_up(end, img->cluster_size) : end;
}

/* Whole subclusters of one cluster (extended L2): zero bits, except in a
 * compressed cluster, which has no subclusters and gets explicit zeroes. */
static int zero_subclusters(qcow2_image *img, uint64_t start, uint64_t end,
                            int unmap)
{
    qcow2_run run;
    int rc;

    if (start >= end)
        return 0;
    rc = qcow2_lookup_run(img, start, end - start, &run);
    if (rc < 0)
        return rc;
    if (run.type == SC_COMPRESSED)
        return write_explicit_zeroes(img, start, min_u64(end, img->size) -
                                     start);
    return change_range(img, start, end, unmap, zero_rule);
}

/* [start, end), aligned to the zero granule: a partial first and last
 * cluster (extended L2 only) and whole clusters between. */
static int zero_aligned(qcow2_image *img, uint64_t start, uint64_t end,
                        int unmap, entry_rule rule)
{
    uint64_t cs = img->cluster_size;
    uint64_t whole_from = align_up(start, cs), whole_to = end & ~(cs - 1);
    int rc;

    if (!img->extended_l2 || whole_from > whole_to)
        return whole_from > whole_to
                   ? zero_subclusters(img, start, end, unmap)
                   : change_range(img, start, end, unmap, rule);
    rc = zero_subclusters(img, start, whole_from, unmap);
    if (rc == 0 && whole_from < whole_to)
        rc = change_range(img, whole_from, whole_to, unmap, rule);
    if (rc == 0)
        rc = zero_subclusters(img, max_u64(whole_to, start), end, unmap);
    return rc;
}

/* A raw data file stays a valid raw image: it gets the zeroes too. */
static int zero_raw_data_file(qcow2_image *img, uint64_t offset,
                              uint64_t length)
{
    size_t chunk = (size_t)min_u64(length, ZERO_CHUNK);
    uint8_t *zeroes = calloc(1, chunk);
    int rc = 0;

    if (!zeroes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint64_t at = offset; at < offset + length && rc == 0; at += chunk)
        rc = qcow2_write_data(img, at, zeroes,
                              (size_t)min_u64(chunk, offset + length - at));
    free(zeroes);
    return rc;
}

static int write_zeroes_call(qcow2_image *img, uint64_t offset,
                             uint64_t length, int unmap)
{
    uint64_t end = offset + length, granule, head_end, tail_start;
    entry_rule rule = zero_rule;
    int rc = check_range(img, "zero write", offset, length);

    if (rc < 0 || length == 0)
        return rc;
    if (img->is_raw || img->hdr.crypt_method != CRYPT_NONE)
        return write_explicit_zeroes(img, offset, length);
    rc = qcow2_begin_update(img);
    if (rc == 0 && (img->hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW))
        rc = zero_raw_data_file(img, offset, length);
    if (rc < 0)
        return rc;
    granule = img->extended_l2 ? img->subcluster_size : img->cluster_size;
    if (img->hdr.version < 3) {
        if (!unmap || img->backing_name)
            return write_explicit_zeroes(img, offset, length);
        rule = unallocate_rule;
        granule = img->cluster_size;
    }
    head_end = align_up(offset, granule);
    tail_start = effective_end(img, end) & ~(granule - 1);
    if (head_end >= tail_start)
        return zero_partial(img, offset, length);
    /* At the disk's end the head may be all there is. */
    rc = zero_partial(img, offset, min_u64(head_end, end) - offset);
    if (rc == 0 && head_end < end)
        rc = zero_aligned(img, head_end, tail_start, unmap, rule);
    if (rc == 0 && tail_start < end)
        rc = zero_partial(img, tail_start, end - tail_start);
    return rc;
}

/* ---- Discard ------------------------------------------------------------------ */

static int discard_call(qcow2_image *img, uint64_t offset,
                        uint64_t length)
{
    uint64_t first, last;
    int rc = check_range(img, "discard", offset, length);

    if (rc < 0 || length == 0 || img->is_raw)
        return rc;
    if (img->hdr.version < 3 && img->backing_name)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "discard is not "
                          "supported on a version 2 image with a backing "
                          "file (the zero flag needs version 3)");
    /* Partial clusters are ignored, as QEMU ignores them. */
    first = align_up(offset, img->cluster_size);
    last = effective_end(img, offset + length) & ~(img->cluster_size - 1);
    if (first >= last)
        return 0;
    rc = qcow2_begin_update(img);
    return rc < 0 ? rc : change_range(img, first, last, 0, discard_rule);
}

int qcow2_write_zeroes(qcow2_image *img, uint64_t offset, uint64_t length,
                       int unmap)
{
    int rc;

    qcow2_call_begin(img);
    rc = write_zeroes_call(img, offset, length, unmap);
    return qcow2_call_end(img, rc);
}

int qcow2_discard(qcow2_image *img, uint64_t offset, uint64_t length)
{
    int rc;

    qcow2_call_begin(img);
    rc = discard_call(img, offset, length);
    return qcow2_call_end(img, rc);
}
