/*
 * Refcount blocks as the allocator reads them (QEMU's qcow2-refcount.c,
 * read side of the write path): spans of entries decoded by the image's
 * refcount codec, validated refcount-table lookups, single refcounts,
 * the first-fit free-cluster search and the scans for the end of the
 * used area. Reads only, through the refcount-block cache: alloc.c, which
 * writes refcounts, builds on these and nothing here calls back up.
 */
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

/* ---- Refcount block spans ---------------------------------------------- */

void alloc_span_init(const qcow2_image *img, uint64_t block_offset,
                     uint64_t first, uint64_t count, uint8_t *bytes,
                     refblock_span *span)
{
    span->block_offset = block_offset;
    span->first = first;
    span->count = count;
    span->codec = img->refcount_codec;
    span->bytes = bytes;
    qcow2_refcount_codec_bytes(span->codec, first, count, &span->byte_start,
                               &span->byte_len, &span->first_in_bytes);
}

uint64_t alloc_span_get(const refblock_span *span, uint64_t entry)
{
    return span->codec->get(span->bytes, entry - span->first_in_bytes);
}

void alloc_span_set(refblock_span *span, uint64_t entry, uint64_t value)
{
    span->codec->set(span->bytes, entry - span->first_in_bytes, value);
}

int alloc_span_load(qcow2_image *img, refblock_span *span)
{
    return qcow2_refcount_block_read(img, span->block_offset,
                                     span->byte_start, span->bytes,
                                     span->byte_len);
}

/* ---- Refcount table and single refcounts -------------------------------- */

/* The refcount block of reftable entry `index` (0: none, or past the
 * table), validated before use. */
int alloc_refblock_at(qcow2_image *img, uint64_t index, uint64_t *block)
{
    uint64_t entry;

    *block = 0;
    if (index >= img->reftable_entries)
        return 0;
    entry = img->reftable[index];
    if (entry & REFT_RESERVED_MASK)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "refcount table entry %llu "
                          "has reserved bits set (0x%llx)",
                          (unsigned long long)index,
                          (unsigned long long)entry);
    *block = entry & REFT_OFFSET_MASK;
    if (!is_aligned(*block, img->cluster_size) ||
        *block > QCOW2_MAX_HOST_OFFSET)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "refcount block offset 0x%llx"
                          " (refcount table entry %llu) is invalid",
                          (unsigned long long)*block,
                          (unsigned long long)index);
    return 0;
}

uint64_t qcow2_refcount_coverage(const qcow2_image *img)
{
    uint64_t clusters;
    if (mul_overflows(img->reftable_entries, img->refblock_entries,
                      &clusters))
        return UINT64_MAX;
    return clusters;
}

int qcow2_refcount_get(qcow2_image *img, uint64_t host_cluster,
                       uint64_t *refcount)
{
    uint64_t entries = img->refblock_entries, block;
    uint8_t bytes[8];
    refblock_span span;
    int rc;

    *refcount = 0;
    rc = alloc_refblock_at(img, host_cluster / entries, &block);
    if (rc < 0 || block == 0)
        return rc;
    alloc_span_init(img, block, host_cluster % entries, 1, bytes, &span);
    rc = alloc_span_load(img, &span);
    if (rc < 0)
        return rc;
    *refcount = alloc_span_get(&span, host_cluster % entries);
    return 0;
}

/* ---- Free-cluster search ----------------------------------------------- */

uint64_t alloc_max_host_cluster(const qcow2_image *img)
{
    return QCOW2_MAX_HOST_OFFSET >> img->cluster_bits;
}

/*
 * First fit: the first run of `count` clusters with refcount 0 at or after
 * *from. Clusters past the refcount table, or under an empty entry, are
 * free. Like QEMU's free_cluster_index, *from ends just past the run.
 */
int alloc_find_free_run(qcow2_image *img, uint64_t *from, uint64_t count,
                        uint64_t *start)
{
    uint64_t entries = img->refblock_entries;
    uint64_t cluster = *from, run_start = *from, run = 0;
    uint8_t *bytes = NULL;
    int rc = 0;

    while (run < count) {
        uint64_t index = cluster / entries, in_block = cluster % entries;
        uint64_t n = entries - in_block, block;
        refblock_span span;

        if (cluster > alloc_max_host_cluster(img) ||
            count - run > alloc_max_host_cluster(img) - cluster) {
            rc = qcow2_fail(img, QCOW2_E_NOSPC, "no room for %llu clusters "
                            "below the largest host offset",
                            (unsigned long long)count);
            break;
        }
        if (index >= img->reftable_entries) {
            run += count - run;         /* nothing is counted out here */
            break;
        }
        rc = alloc_refblock_at(img, index, &block);
        if (rc < 0)
            break;
        if (block == 0) {
            run += min_u64(n, count - run);   /* the whole block is free */
            cluster += n;
            continue;
        }
        if (!bytes && !(bytes = malloc(img->cluster_size))) {
            rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
            break;
        }
        alloc_span_init(img, block, in_block, n, bytes, &span);
        rc = alloc_span_load(img, &span);
        if (rc < 0)
            break;
        for (uint64_t e = in_block; e < entries && run < count; e++) {
            cluster++;
            if (alloc_span_get(&span, e) != 0) {
                run = 0;
                run_start = cluster;
            } else {
                run++;
            }
        }
    }
    free(bytes);
    if (rc < 0)
        return rc;
    *start = run_start;
    *from = run_start + count;
    return 0;
}

/* ---- End of the used area -------------------------------------------------- */

int qcow2_last_used_cluster(qcow2_image *img, uint64_t clusters,
                            int64_t *last)
{
    uint64_t entries = img->refblock_entries;
    uint8_t *bytes;
    int rc = 0;

    *last = -1;
    if (clusters == 0)
        return 0;
    bytes = malloc(img->cluster_size);
    if (!bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint64_t index = (clusters - 1) / entries + 1; index-- > 0;) {
        uint64_t block, n;
        refblock_span span;

        rc = alloc_refblock_at(img, index, &block);
        if (rc < 0 || block == 0) {
            if (rc < 0)
                break;
            continue;
        }
        n = min_u64(entries, clusters - index * entries);
        alloc_span_init(img, block, 0, n, bytes, &span);
        rc = alloc_span_load(img, &span);
        if (rc < 0)
            break;
        for (uint64_t e = n; e-- > 0;) {
            if (alloc_span_get(&span, e) != 0) {
                *last = (int64_t)(index * entries + e);
                free(bytes);
                return 0;
            }
        }
    }
    free(bytes);
    return rc;
}

int qcow2_refblock_unused(qcow2_image *img, uint64_t index, int *unused)
{
    uint64_t entries = img->refblock_entries, block, self = UINT64_MAX;
    uint8_t *bytes;
    refblock_span span;
    int rc;

    *unused = 0;
    rc = alloc_refblock_at(img, index, &block);
    if (rc < 0 || block == 0)
        return rc;
    bytes = malloc(img->cluster_size);
    if (!bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    alloc_span_init(img, block, 0, entries, bytes, &span);
    rc = alloc_span_load(img, &span);
    if (rc == 0) {
        /* A block that counts only itself counts nothing. */
        if ((block >> img->cluster_bits) / entries == index) {
            self = (block >> img->cluster_bits) % entries;
            alloc_span_set(&span, self, 0);
        }
        *unused = 1;
        for (uint64_t i = 0; i < img->cluster_size && *unused; i++)
            *unused = bytes[i] == 0;
    }
    free(bytes);
    return rc;
}
