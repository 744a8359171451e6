/*
 * L1/L2 writes, the table-shaping part (layer 7): the active L1 table
 * grown at fresh clusters (l1_grow.c) and QEMU's metadata preallocation
 * (prealloc.c). Operations (create, resize, snapshot apply) call down to
 * these; nothing below layer 7 calls them.
 */
#ifndef QCOW2_L1_WRITE_H
#define QCOW2_L1_WRITE_H

#include "alloc.h"

/* Word 0 of L2 entry l2_index in a raw (big-endian) table; with extended
 * L2 the subcluster bitmap follows it and is left alone here. */
static inline uint64_t qcow2_l2_entry_get(const qcow2_image *img,
                                          const uint8_t *table,
                                          uint64_t l2_index)
{
    return be64(table + l2_index * img->l2_entry_bytes);
}

static inline void qcow2_l2_entry_set(const qcow2_image *img, uint8_t *table,
                                      uint64_t l2_index, uint64_t entry)
{
    put_be64(table + l2_index * img->l2_entry_bytes, entry);
}

/* l1_grow.c: grow the active L1 to exactly min_entries (QEMU's exact
 * growth): new table at fresh clusters, synced, header pair switched, old
 * one freed. */
int qcow2_l1_grow(qcow2_image *img, uint64_t min_entries);

/* prealloc.c: QEMU's metadata preallocation of guest [from, to): every
 * unallocated cluster gets a host cluster (L2 tables allocated as needed,
 * entries COPIED, subcluster bitmaps left 0). reserved_host: 0 to
 * allocate data clusters per L2 table (each table's data right after it),
 * else the first of the clusters already reserved contiguously
 * (falloc/full). With an external data file the mapping is the identity. */
int qcow2_preallocate_metadata(qcow2_image *img, uint64_t from, uint64_t to,
                               uint64_t reserved_host);

#endif /* QCOW2_L1_WRITE_H */
