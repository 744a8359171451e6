/*
 * Virtual-size changes (QEMU's qcow2_co_truncate): the L1 table grows to
 * the exact size needed at fresh clusters; shrinking drops the guest
 * clusters past the new end and the L2 tables past the new L1 range; and
 * metadata preallocation, shared with create.c.
 */
#include <stdlib.h>
#include <string.h>

#include "write.h"

static uint64_t l1_coverage(const qcow2_image *img)
{
    return 1ull << (img->cluster_bits + img->l2_bits);
}

/* ---- L1 growth ------------------------------------------------------------ */

int qcow2_l1_grow(qcow2_image *img, uint64_t min_entries)
{
    uint64_t old_offset = img->hdr.l1_table_offset;
    uint32_t old_size = img->l1_size;
    uint64_t bytes, new_offset;
    uint64_t *l1;
    uint8_t *table;
    int rc;

    if (min_entries <= old_size)
        return 0;
    if (min_entries > QCOW2_MAX_L1_BYTES / 8)
        return qcow2_fail(img, QCOW2_E_INVALID, "The image size is too large "
                          "for file format 'qcow2' (try using a larger "
                          "cluster size)");
    bytes = min_entries * 8;
    l1 = calloc(min_entries, sizeof *l1);
    table = calloc(1, bytes);
    if (!l1 || !table) {
        free(l1);
        free(table);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    if (old_size)
        memcpy(l1, img->l1, (size_t)old_size * sizeof *l1);
    for (uint64_t i = 0; i < min_entries; i++)
        put_be64(table + i * 8, l1[i]);

    /* New table at fresh clusters, synced, then the header pair switched
     * in one write; the old table is freed last (a crash leaks it). */
    rc = qcow2_alloc_clusters(img, div_round_up(bytes, img->cluster_size),
                              &new_offset);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_write_checked(img, 0, "l1", new_offset, table, bytes);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_l1(img, new_offset, (uint32_t)min_entries);
    free(table);
    if (rc < 0) {
        free(l1);
        return rc;
    }
    free(img->l1);
    img->l1 = l1;
    img->l1_size = (uint32_t)min_entries;
    if (old_size)
        (void)qcow2_free_clusters(img, old_offset, (uint64_t)old_size * 8);
    return 0;
}

/* ---- Metadata preallocation ------------------------------------------------ */

static uint64_t l2_entry_get(const qcow2_image *img, const uint8_t *table,
                             uint64_t l2_index)
{
    return be64(table + l2_index * img->l2_entry_bytes);
}

static void l2_entry_set(const qcow2_image *img, uint8_t *table,
                         uint64_t l2_index, uint64_t entry)
{
    /* The subcluster bitmap stays 0, as QEMU's preallocation leaves it. */
    put_be64(table + l2_index * img->l2_entry_bytes, entry);
}

static int has_data_file(const qcow2_image *img)
{
    return (img->hdr.incompatible_features & INCOMPAT_DATA_FILE) != 0;
}

/* The L2 table of l1_index into `table`: read when there is one (it must
 * be ours alone), else allocated and zeroed (*is_new). */
static int prealloc_l2_table(qcow2_image *img, uint32_t l1_index,
                             uint8_t *table, uint64_t *l2_offset, int *is_new)
{
    uint64_t entry = img->l1[l1_index];

    *l2_offset = entry & L1E_OFFSET_MASK;
    *is_new = *l2_offset == 0;
    if (*is_new) {
        memset(table, 0, img->cluster_size);
        return qcow2_alloc_clusters(img, 1, l2_offset);
    }
    if (!(entry & QCOW_OFLAG_COPIED))
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "cannot preallocate "
                          "into the shared L2 table at 0x%llx",
                          (unsigned long long)*l2_offset);
    return qcow2_read_meta(img, *l2_offset, table, img->cluster_size,
                           "L2 table");
}

/* Point the unallocated entries [first, end) of one L2 table at host
 * clusters: the identity in an external data file, the reserved area
 * when *reserved is set, else clusters allocated per run (QEMU places
 * each L2 table's data right after it). *last_end: end of the mapping. */
static int prealloc_entries(qcow2_image *img, uint8_t *table,
                            uint64_t guest_base, uint64_t first, uint64_t end,
                            uint64_t *reserved, uint64_t *last_host)
{
    uint64_t cs = img->cluster_size;

    for (uint64_t i = first; i < end;) {
        uint64_t run = 0, host;
        int rc;

        while (i + run < end && l2_entry_get(img, table, i + run) == 0)
            run++;
        if (run == 0) {
            i++;
            continue;
        }
        if (has_data_file(img)) {
            host = guest_base + i * cs;
        } else if (*reserved) {
            host = *reserved;
            *reserved += run * cs;
        } else {
            rc = qcow2_alloc_clusters(img, run, &host);
            if (rc < 0)
                return rc;
        }
        for (uint64_t k = 0; k < run; k++)
            l2_entry_set(img, table, i + k,
                         QCOW_OFLAG_COPIED | (host + k * cs));
        *last_host = host + (run - 1) * cs;
        i += run;
    }
    return 0;
}

int qcow2_preallocate_metadata(qcow2_image *img, uint64_t from, uint64_t to,
                               uint64_t reserved_host)
{
    uint64_t cs = img->cluster_size, coverage = l1_coverage(img);
    uint64_t last_host = 0, file_end;
    uint8_t *table;
    int rc = 0;

    if (from >= to)
        return 0;
    if (to > img->l1_size * coverage)
        return qcow2_fail(img, QCOW2_E_INVALID, "preallocation past the L1 "
                          "table");
    table = malloc(cs);
    if (!table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint64_t guest = from & ~(cs - 1); guest < to;) {
        uint32_t l1_index = (uint32_t)(guest / coverage);
        uint64_t base = (uint64_t)l1_index * coverage;
        uint64_t first = (guest - base) >> img->cluster_bits;
        uint64_t end = div_round_up(min_u64(to, base + coverage) - base, cs);
        uint64_t l2_offset;
        int is_new;

        rc = prealloc_l2_table(img, l1_index, table, &l2_offset, &is_new);
        if (rc == 0)
            rc = prealloc_entries(img, table, base, first, end,
                                  &reserved_host, &last_host);
        /* Refcounts first, then the table, then the L1 entry. */
        if (rc == 0)
            rc = qcow2_barrier(img);
        if (rc == 0)
            rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2, "l2", l2_offset,
                                     table, cs);
        if (rc == 0 && img->l2_cache)
            qcow2_l2_cache_drop(img->l2_cache, l2_offset);
        if (rc == 0 && is_new) {
            rc = qcow2_barrier(img);
            if (rc == 0)
                rc = qcow2_l1_entry_write(img, l1_index,
                                    l2_offset | QCOW_OFLAG_COPIED);
        }
        if (rc < 0)
            break;
        guest = base + end * cs;
    }
    free(table);
    if (rc < 0 || has_data_file(img) || last_host == 0)
        return rc;
    /* Reads past the end of the file must find the clusters: the file
     * ends with the last mapped cluster, as QEMU extends it. */
    file_end = last_host + cs;
    {
        uint64_t size;
        rc = img->io->ops->size(img->io, &size);
        if (rc == 0 && size < file_end)
            rc = img->io->ops->truncate(img->io, file_end);
        if (rc < 0)
            return qcow2_fail(img, rc, "cannot extend the image file to "
                              "0x%llx", (unsigned long long)file_end);
    }
    return 0;
}

/* ---- Shrinking ------------------------------------------------------------- */

/* Drop the reference one L2 entry holds: the host range it counts. */
static int entry_release(qcow2_image *img, uint64_t entry)
{
    if (entry & QCOW_OFLAG_COMPRESSED) {
        uint32_t x = 70 - img->cluster_bits;
        uint64_t coffset = entry & ((1ull << x) - 1);
        uint64_t sectors = ((entry >> x) &
                            ((1ull << (img->cluster_bits - 8)) - 1)) + 1;
        /* QEMU frees the stream's whole sectors. */
        return qcow2_free_clusters(img, coffset & ~511ull, sectors * 512);
    }
    if (has_data_file(img) || (entry & L2E_OFFSET_MASK) == 0)
        return 0;
    return qcow2_free_clusters(img, entry & L2E_OFFSET_MASK,
                               img->cluster_size);
}

/* -1 on every host range an L2 table references. Failures only leak. */
static void release_entries(qcow2_image *img, const uint8_t *table,
                            uint64_t first, uint64_t end)
{
    for (uint64_t i = first; i < end; i++) {
        uint64_t entry = l2_entry_get(img, table, i);
        if (entry & ~QCOW_OFLAG_ZERO)
            (void)entry_release(img, entry);
    }
}

/* Clear entries [first, end) of the L2 table of l1_index, copying the
 * table first when a snapshot shares it. */
static int shrink_l2_tail(qcow2_image *img, uint32_t l1_index,
                          uint64_t first, uint64_t end)
{
    uint64_t l1_entry = img->l1[l1_index];
    uint64_t l2_offset = l1_entry & L1E_OFFSET_MASK, target = l2_offset;
    uint8_t *table, *old;
    int shared = !(l1_entry & QCOW_OFLAG_COPIED), rc;

    if (l2_offset == 0 || first >= end)
        return 0;
    table = malloc(2 * img->cluster_size);
    if (!table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    old = table + img->cluster_size;
    rc = qcow2_read_meta(img, l2_offset, table, img->cluster_size,
                         "L2 table");
    if (rc < 0)
        goto out;
    memcpy(old, table, img->cluster_size);
    memset(table + first * img->l2_entry_bytes, 0,
           (end - first) * img->l2_entry_bytes);
    if (shared) {
        rc = qcow2_alloc_clusters(img, 1, &target);
        if (rc == 0)
            rc = qcow2_barrier(img);
    }
    /* The references go first (synced), the refcounts drop after. */
    if (rc == 0)
        rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2, "l2", target, table,
                                 img->cluster_size);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (img->l2_cache)
        qcow2_l2_cache_drop(img->l2_cache, l2_offset);
    if (rc == 0 && shared)
        rc = qcow2_l1_entry_write(img, l1_index, target | QCOW_OFLAG_COPIED);
    if (rc < 0)
        goto out;
    release_entries(img, old, first, end);
    if (shared)
        (void)qcow2_free_clusters(img, l2_offset, img->cluster_size);
out:
    free(table);
    return rc;
}

/* Empty the L1 entries from new_l1_size on (the table keeps its size, as
 * QEMU's qcow2_shrink_l1_table keeps it), then drop what they held. */
static int shrink_l1_tail(qcow2_image *img, uint32_t new_l1_size)
{
    uint32_t old_size = img->l1_size;
    uint64_t *dropped;
    uint8_t *zeroes, *table;
    int rc;

    if (new_l1_size >= old_size)
        return 0;
    dropped = malloc((size_t)(old_size - new_l1_size) * sizeof *dropped);
    zeroes = calloc(old_size - new_l1_size, 8);
    table = malloc(img->cluster_size);
    if (!dropped || !zeroes || !table) {
        rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        goto out;
    }
    memcpy(dropped, img->l1 + new_l1_size,
           (size_t)(old_size - new_l1_size) * sizeof *dropped);
    rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L1, "l1",
                             img->hdr.l1_table_offset + 8ull * new_l1_size,
                             zeroes, 8ull * (old_size - new_l1_size));
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        goto out;
    memset(img->l1 + new_l1_size, 0,
           (size_t)(old_size - new_l1_size) * sizeof *img->l1);
    for (uint32_t i = 0; i < old_size - new_l1_size; i++) {
        uint64_t l2_offset = dropped[i] & L1E_OFFSET_MASK;
        if (!l2_offset)
            continue;
        if (img->l2_cache)
            qcow2_l2_cache_drop(img->l2_cache, l2_offset);
        /* The active tree lets go of the table and of what it maps. */
        if (qcow2_read_meta(img, l2_offset, table, img->cluster_size,
                            "L2 table") == 0)
            release_entries(img, table, 0, img->l2_entries);
        (void)qcow2_free_clusters(img, l2_offset, img->cluster_size);
    }
out:
    free(dropped);
    free(zeroes);
    free(table);
    return rc;
}

/* Unhook refcount blocks that count nothing but themselves (QEMU's
 * qcow2_shrink_reftable): the whole table rewritten in one synced write,
 * then blocks counted elsewhere are freed. Failures only leak. */
static void shrink_reftable(qcow2_image *img)
{
    uint64_t entries = img->reftable_entries;
    uint64_t *kept = malloc(entries * sizeof *kept);
    uint8_t *table = malloc(entries * 8);
    int dropped = 0;

    if (!kept || !table)
        goto out;
    for (uint64_t i = 0; i < entries; i++) {
        int unused = 0;
        kept[i] = img->reftable[i];
        if (kept[i] && qcow2_refblock_unused(img, i, &unused) == 0 && unused) {
            kept[i] = 0;
            dropped = 1;
        }
        put_be64(table + i * 8, kept[i]);
    }
    if (!dropped ||
        qcow2_write_checked(img, OVERLAP_REFCOUNT_TABLE, "refcount_table",
                            img->hdr.refcount_table_offset, table,
                            entries * 8) < 0 ||
        qcow2_barrier(img) < 0)
        goto out;
    for (uint64_t i = 0; i < entries; i++) {
        uint64_t block = img->reftable[i] & REFT_OFFSET_MASK;
        if (kept[i] || !block)
            continue;
        img->reftable[i] = 0;
        /* A self-counting block took its count with it. */
        if ((block >> img->cluster_bits) / img->refblock_entries != i)
            (void)qcow2_free_clusters(img, block, img->cluster_size);
    }
out:
    free(kept);
    free(table);
}

/* Cut the file after the last cluster in use; a failure is harmless. */
static void trim_file_tail(qcow2_image *img)
{
    uint64_t file_size;
    int64_t last;

    if (img->io->ops->size(img->io, &file_size) < 0 ||
        qcow2_last_used_cluster(img, div_round_up(file_size,
                                                  img->cluster_size),
                                &last) < 0)
        return;
    if ((uint64_t)(last + 1) * img->cluster_size < file_size) {
        (void)img->io->ops->truncate(img->io,
                                     (uint64_t)(last + 1) * img->cluster_size);
        /* Cached blocks past the cut would outlive their bytes. */
        qcow2_refcount_cache_drop_all(img);
    }
}

static int shrink(qcow2_image *img, uint64_t size)
{
    uint64_t cs = img->cluster_size, coverage = l1_coverage(img);
    uint64_t cut = align_up(size, cs), old_size = img->size;
    uint64_t new_l1_size;
    int rc;

    rc = qcow2_l1_entries_needed(img, size, &new_l1_size);
    if (rc < 0)
        return qcow2_fail(img, QCOW2_E_INVALID, "size %llu too large",
                          (unsigned long long)size);
    /* The table that keeps part of its range loses its tail. */
    if (cut < old_size && cut % coverage != 0) {
        uint32_t l1_index = (uint32_t)(cut / coverage);
        uint64_t base = (uint64_t)l1_index * coverage;
        uint64_t end = div_round_up(min_u64(old_size, base + coverage) - base,
                                    cs);
        if (l1_index < img->l1_size) {
            rc = shrink_l2_tail(img, l1_index, (cut - base) / cs, end);
            if (rc < 0)
                return rc;
        }
    }
    rc = shrink_l1_tail(img, (uint32_t)new_l1_size);
    if (rc < 0)
        return rc;
    shrink_reftable(img);
    trim_file_tail(img);
    return 0;
}

/* ---- qcow2_resize ------------------------------------------------------------ */

static int grow(qcow2_image *img, uint64_t size)
{
    uint64_t needed, old_size = img->size;
    int rc = qcow2_l1_entries_needed(img, size, &needed);

    if (rc < 0 || needed > QCOW2_MAX_L1_BYTES / 8)
        return qcow2_fail(img, QCOW2_E_INVALID, "The image size is too large "
                          "for file format 'qcow2' (try using a larger "
                          "cluster size)");
    rc = qcow2_l1_grow(img, needed);
    if (rc < 0)
        return rc;
    /* A raw data file must stay readable through the metadata too: the
     * new range is mapped 1:1 at once, as QEMU does. */
    if (img->hdr.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)
        rc = qcow2_preallocate_metadata(img, old_size, size, 0);
    if (rc == 0 && has_data_file(img) && img->data_io != img->io) {
        uint64_t data_size;
        rc = img->data_io->ops->size(img->data_io, &data_size);
        if (rc == 0 && data_size < size)
            rc = img->data_io->ops->truncate(img->data_io, size);
        if (rc < 0)
            rc = qcow2_fail(img, rc, "cannot grow the data file to %llu "
                            "bytes", (unsigned long long)size);
    }
    return rc;
}

/* The grown range reads as zeroes even where the backing file is longer
 * than the old size: QEMU's truncate zero-writes [old, min(new, backing))
 * so stale backing data never shows through. */
static int zero_over_backing(qcow2_image *img, uint64_t old_size,
                             uint64_t size)
{
    uint64_t backing_size, end;

    if (!img->backing)
        return 0;
    backing_size = qcow2_virtual_size(img->backing);
    if (backing_size <= old_size)
        return 0;
    end = min_u64(size, backing_size);
    return qcow2_write_zeroes(img, old_size, end - old_size, 0);
}

int qcow2_resize(qcow2_image *img, uint64_t size)
{
    int rc = qcow2_check_writable(img);

    if (rc < 0)
        return rc;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "cannot resize a raw "
                          "image");
    if (size % 512)
        return qcow2_fail(img, QCOW2_E_INVALID, "The new size must be a "
                          "multiple of 512");
    if (img->nb_snapshots && img->hdr.version < 3)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Can't resize a v2 "
                          "image which has snapshots");
    if (img->ext.has_bitmaps)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Cannot resize qcow2 "
                          "with persistent bitmaps");
    if (size == img->size)
        return 0;
    uint64_t old_size = img->size;
    rc = size > img->size ? grow(img, size) : shrink(img, size);
    if (rc == 0)
        rc = qcow2_header_set_size(img, size);
    if (rc == 0)
        img->size = size;
    if (rc == 0 && size > old_size)
        rc = zero_over_backing(img, old_size, size);
    return rc;
}
