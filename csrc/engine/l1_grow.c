/*
 * Growth of the active L1 table (QEMU's qcow2_grow_l1_table, exact size):
 * used by resize, create and snapshot apply to make room for a larger
 * virtual size.
 */
#include <stdlib.h>
#include <string.h>

#include "write_path.h"

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
