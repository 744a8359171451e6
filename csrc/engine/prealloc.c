/*
 * QEMU's metadata preallocation (preallocation=metadata/falloc/full, and
 * the 1:1 mapping of a raw external data file): L2 tables and their
 * entries written for a guest range, in crash-safe order. Shared by
 * create.c and resize.c.
 */
#include <stdlib.h>
#include <string.h>

#include "write_path.h"

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

        while (i + run < end && qcow2_l2_entry_get(img, table, i + run) == 0)
            run++;
        if (run == 0) {
            i++;
            continue;
        }
        if (qcow2_has_data_file(img)) {
            host = guest_base + i * cs;
        } else if (*reserved) {
            host = *reserved;
            *reserved += run * cs;
        } else {
            rc = qcow2_alloc_clusters(img, run, &host);
            if (rc < 0)
                return rc;
        }
        /* The subcluster bitmap stays 0, as QEMU's preallocation
         * leaves it. */
        for (uint64_t k = 0; k < run; k++)
            qcow2_l2_entry_set(img, table, i + k,
                               QCOW_OFLAG_COPIED | (host + k * cs));
        *last_host = host + (run - 1) * cs;
        i += run;
    }
    return 0;
}

int qcow2_preallocate_metadata(qcow2_image *img, uint64_t from, uint64_t to,
                               uint64_t reserved_host)
{
    uint64_t cs = img->cluster_size, coverage = qcow2_l2_coverage(img);
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
    if (rc < 0 || qcow2_has_data_file(img) || last_host == 0)
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
