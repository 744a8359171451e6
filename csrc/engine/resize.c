/*
 * Virtual-size changes (QEMU's qcow2_co_truncate): the L1 table grows to
 * the exact size needed at fresh clusters; shrinking drops the guest
 * clusters past the new end and the L2 tables past the new L1 range. L1
 * growth and metadata preallocation are the layer below (l1_write.h).
 */
#include <stdlib.h>
#include <string.h>

#include "ops.h"

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
    if (qcow2_has_data_file(img) || (entry & L2E_OFFSET_MASK) == 0)
        return 0;
    return qcow2_free_clusters(img, entry & L2E_OFFSET_MASK,
                               img->cluster_size);
}

/* -1 on every host range an L2 table references. Failures only leak. */
static void release_entries(qcow2_image *img, const uint8_t *table,
                            uint64_t first, uint64_t end)
{
    for (uint64_t i = first; i < end; i++) {
        uint64_t entry = qcow2_l2_entry_get(img, table, i);
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
    uint64_t cs = img->cluster_size, coverage = qcow2_l2_coverage(img);
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
    if (rc == 0 && qcow2_has_data_file(img) && img->data_io != img->io) {
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

static int resize_work(qcow2_image *img, uint64_t size)
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

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_resize(qcow2_image *img, uint64_t size)
{
    QCOW2_HELD(img, resize_work(img, size));
}
