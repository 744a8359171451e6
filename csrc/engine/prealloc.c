/*
 * QEMU's metadata preallocation (preallocation=metadata/falloc/full, and
 * the 1:1 mapping of a raw external data file): L2 tables and their
 * entries written for a guest range, in crash-safe order, a group of
 * tables at a time. Shared by create.c and resize.c.
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

/* Tables prepared before they are written: up to 1 MiB of them (and at
 * most 512), so that one barrier orders a group's refcounts before its
 * tables and one its tables before their L1 entries, where a table at a
 * time made three syncs per table (7,000 for a 1 TiB image). 1 MiB keeps
 * the peak RSS of a 1 TiB create under qemu-img's (4 MiB did not). */
#define GROUP_BYTES     ((uint64_t)1 << 20)
#define GROUP_TABLES    512u

typedef struct prealloc_group {
    uint8_t *tables;            /* count clusters, one table each */
    uint64_t offsets[GROUP_TABLES];
    int is_new[GROUP_TABLES];
    uint32_t first_l1;          /* the tables of L1 entries first_l1.. */
    uint32_t count, capacity;
} prealloc_group;

/* The L1 entries of the group's new tables, each run of adjacent ones
 * one write, after a barrier (the tables on disk first). */
static int hook_new_tables(qcow2_image *img, const prealloc_group *g)
{
    uint64_t entries[GROUP_TABLES];
    int synced = 0, rc = 0;

    for (uint32_t k = 0; rc == 0 && k < g->count;) {
        uint32_t n = 0;
        while (k + n < g->count && g->is_new[k + n]) {
            entries[n] = g->offsets[k + n] | QCOW_OFLAG_COPIED;
            n++;
        }
        if (n == 0) {
            k++;
            continue;
        }
        if (!synced && (rc = qcow2_barrier(img)) < 0)
            return qcow2_poison(img, rc);
        synced = 1;
        rc = qcow2_l1_entries_write(img, g->first_l1 + k, entries, n);
        k += n;
    }
    return rc;
}

/* Refcounts first (every cluster of the group is allocated by now), then
 * the tables, then the L1 entries. */
static int write_group(qcow2_image *img, prealloc_group *g)
{
    uint64_t cs = img->cluster_size;
    int rc = g->count ? qcow2_barrier(img) : 0;

    for (uint32_t k = 0; rc == 0 && k < g->count; k++) {
        rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2, "l2", g->offsets[k],
                                 g->tables + k * cs, cs);
        if (rc == 0 && img->l2_cache)
            qcow2_l2_cache_drop(img->l2_cache, g->offsets[k]);
    }
    if (rc == 0)
        rc = hook_new_tables(img, g);
    g->count = 0;
    return rc;
}

int qcow2_preallocate_metadata(qcow2_image *img, uint64_t from, uint64_t to,
                               uint64_t reserved_host)
{
    uint64_t cs = img->cluster_size, coverage = qcow2_l2_coverage(img);
    uint64_t last_host = 0, file_end;
    prealloc_group *g;
    int rc = 0;

    if (from >= to)
        return 0;
    if (to > img->l1_size * coverage)
        return qcow2_fail(img, QCOW2_E_INVALID, "preallocation past the L1 "
                          "table");
    g = calloc(1, sizeof *g);
    if (g) {
        uint64_t fit = GROUP_BYTES / cs;
        g->capacity = fit < 1 ? 1 : fit > GROUP_TABLES ? GROUP_TABLES
                                                       : (uint32_t)fit;
        g->tables = malloc((size_t)(g->capacity * cs));
    }
    if (!g || !g->tables) {
        free(g);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    for (uint64_t guest = from & ~(cs - 1); guest < to;) {
        uint32_t l1_index = (uint32_t)(guest / coverage);
        uint64_t base = (uint64_t)l1_index * coverage;
        uint64_t first = (guest - base) >> img->cluster_bits;
        uint64_t end = div_round_up(min_u64(to, base + coverage) - base, cs);
        uint32_t k;

        if (g->count == g->capacity && (rc = write_group(img, g)) < 0)
            break;
        if (g->count == 0)
            g->first_l1 = l1_index;
        k = g->count;
        rc = prealloc_l2_table(img, l1_index, g->tables + k * cs,
                               &g->offsets[k], &g->is_new[k]);
        if (rc == 0)
            rc = prealloc_entries(img, g->tables + k * cs, base, first, end,
                                  &reserved_host, &last_host);
        if (rc < 0)
            break;
        g->count++;
        guest = base + end * cs;
    }
    /* A failure leaves the group unwritten: its clusters leak. */
    if (rc == 0)
        rc = write_group(img, g);
    free(g->tables);
    free(g);
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
