/*
 * Refcount-table growth (QEMU's qcow2_refcount_area): a new, larger
 * refcount table and the refcount blocks that describe the area it is
 * placed in, written before the header switches to them, in crash-safe
 * order. Split from alloc.c, which calls it when a refcount block needs a
 * table entry that does not exist yet.
 */
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

/* ---- Refcount table growth ------------------------------------------------ */

/* QEMU's fixed point: refcount blocks needed so that `clusters` plus the
 * blocks and table themselves are covered; `generous` adds half the
 * table again, as QEMU does for a table that will keep growing. */
static uint64_t refcount_blocks_needed(const qcow2_image *img,
                                       uint64_t clusters, int generous)
{
    uint64_t per_table_cluster = img->cluster_size / 8;
    uint64_t entries = img->refblock_entries;
    uint64_t table = 0, blocks = 0, total = 0, previous;

    do {
        previous = total;
        blocks = div_round_up(clusters + table + blocks, entries);
        table = div_round_up(blocks, per_table_cluster);
        total = clusters + blocks + table;
        if (total == previous && generous) {
            clusters += div_round_up(table, 2);
            total = 0;
            generous = 0;
        }
    } while (total != previous);
    return blocks;
}

/* Set refcount 1 on the clusters of [area_first, area_end) that refcount
 * block `index` covers; they must be free. A new block is written whole. */
static int count_area_in_block(qcow2_image *img, uint64_t index,
                               uint64_t block, int is_new,
                               uint64_t area_first, uint64_t area_end,
                               uint8_t *bytes)
{
    uint64_t entries = img->refblock_entries;
    uint64_t covered = index * entries;
    uint64_t first = max_u64(area_first, covered);
    uint64_t end = min_u64(area_end, covered + entries);
    refblock_span span;
    int rc;

    if (is_new) {
        memset(bytes, 0, img->cluster_size);
        alloc_span_init(img, block, 0, entries, bytes, &span);
    } else if (first < end) {
        alloc_span_init(img, block, first - covered, end - first, bytes, &span);
        rc = alloc_span_load(img, &span);
        if (rc < 0)
            return rc;
    } else {
        return 0;
    }
    for (uint64_t c = first; c < end; c++) {
        if (alloc_span_get(&span, c - covered) != 0)
            return qcow2_fail(img, QCOW2_E_CORRUPT, "cluster %llu meant for "
                              "the new refcount structures is in use",
                              (unsigned long long)c);
        alloc_span_set(&span, c - covered, 1);
    }
    rc = alloc_span_store(img, &span);
    if (rc == 0 && is_new)
        qcow2_refcount_cache_install(img, block, bytes);
    return rc;
}

static int write_reftable(qcow2_image *img, const uint64_t *table,
                          uint64_t entries, uint64_t offset)
{
    uint8_t *bytes = malloc(entries * 8);
    int rc;

    if (!bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint64_t i = 0; i < entries; i++)
        put_be64(bytes + i * 8, table[i]);
    rc = qcow2_write_checked(img, OVERLAP_REFCOUNT_TABLE, "refcount_table",
                             offset, bytes, entries * 8);
    free(bytes);
    return rc;
}

int qcow2_refcount_area(qcow2_image *img, uint64_t start_offset,
                        uint64_t additional_clusters, int exact,
                        uint64_t new_block_index, uint64_t new_block_offset,
                        uint64_t *end_offset)
{
    uint64_t cs = img->cluster_size, per_table_cluster = cs / 8;
    uint64_t start = start_offset >> img->cluster_bits;
    uint64_t clusters, total_blocks, table_entries, table_clusters;
    uint64_t area_index, missing = 0, block_cluster, table_cluster, end;
    uint64_t old_offset = img->hdr.refcount_table_offset;
    uint64_t old_clusters = img->hdr.refcount_table_clusters;
    uint64_t *table;
    uint8_t *bytes;
    int rc;

    rc = alloc_need_write_state(img);
    if (rc < 0)
        return rc;
    if (!is_aligned(start_offset, cs) ||
        add_overflows(start, additional_clusters, &clusters) ||
        clusters > alloc_max_host_cluster(img))
        return qcow2_fail(img, QCOW2_E_NOSPC, "refcount structures for "
                          "0x%llx clusters do not fit",
                          (unsigned long long)additional_clusters);
    total_blocks = refcount_blocks_needed(img, clusters, !exact);
    table_entries = exact ? total_blocks
                          : total_blocks + div_round_up(total_blocks, 2);
    table_entries = align_up(table_entries, per_table_cluster);
    if (total_blocks > REFTABLE_MAX_ENTRIES ||
        table_entries > REFTABLE_MAX_ENTRIES)
        return qcow2_fail(img, QCOW2_E_NOSPC, "refcount table would exceed "
                          "%u bytes", QCOW2_MAX_REFTABLE_BYTES);
    table_clusters = table_entries / per_table_cluster;
    area_index = start / img->refblock_entries;

    table = calloc(table_entries, sizeof *table);
    bytes = malloc(cs);
    if (!table || !bytes) {
        rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        goto out;
    }
    for (uint64_t i = 0; i < img->reftable_entries; i++) {
        if (i < table_entries) {
            table[i] = img->reftable[i];
        } else if (img->reftable[i]) {
            rc = qcow2_fail(img, QCOW2_E_INVALID, "refcount block %llu in "
                            "use past the new refcount table",
                            (unsigned long long)i);
            goto out;
        }
    }
    if (new_block_offset) {
        if (new_block_index >= total_blocks) {
            rc = qcow2_fail(img, QCOW2_E_INVALID, "new refcount block %llu "
                            "outside the new refcount table",
                            (unsigned long long)new_block_index);
            goto out;
        }
        table[new_block_index] = new_block_offset;
    }
    for (uint64_t i = area_index; i < total_blocks; i++)
        missing += table[i] == 0;
    table_cluster = start + missing;
    end = table_cluster + table_clusters;

    /* The blocks first (new ones whole), each counting the new
     * structures it covers; then the table; then the header switch. */
    block_cluster = start;
    for (uint64_t i = area_index; i < total_blocks; i++) {
        int is_new = table[i] == 0;
        if (is_new)
            table[i] = (block_cluster++) << img->cluster_bits;
        rc = count_area_in_block(img, i, table[i] & REFT_OFFSET_MASK, is_new,
                                 start, end, bytes);
        if (rc < 0)
            goto out;
    }
    rc = qcow2_barrier(img);
    if (rc == 0)
        rc = write_reftable(img, table, table_entries,
                            table_cluster << img->cluster_bits);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_reftable(img, table_cluster << img->cluster_bits,
                                       (uint32_t)table_clusters);
    if (rc < 0)
        goto out;

    free(img->reftable);
    img->reftable = table;
    img->reftable_entries = table_entries;
    table = NULL;
    *end_offset = end << img->cluster_bits;
    /* A failure to free the old table only leaks it. */
    if (old_clusters)
        (void)qcow2_free_clusters(img, old_offset, old_clusters * cs);
    rc = 0;
out:
    free(table);
    free(bytes);
    return rc;
}
