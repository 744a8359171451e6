/*
 * What refcount_scan.c (reading refcount blocks for the allocator) gives
 * alloc.c (writing them): spans of refcount-block entries, validated
 * refcount-table lookups and the free-cluster search. Calls go one way,
 * from alloc.c down to refcount_scan.c.
 */
#ifndef QCOW2_ALLOC_H
#define QCOW2_ALLOC_H

#include "write.h"

#define REFTABLE_MAX_ENTRIES  (QCOW2_MAX_REFTABLE_BYTES / 8)

/* Some entries of one refcount block, held as the bytes that store them
 * and packed by the image's refcount codec (refcount_codec.c). */
typedef struct refblock_span {
    uint64_t block_offset;      /* host offset of the refcount block */
    uint64_t first;             /* first entry (index inside the block) */
    uint64_t count;             /* entries */
    uint64_t byte_start;        /* byte of the block holding `first` */
    size_t byte_len;
    uint64_t first_in_bytes;    /* the entry bytes[0] starts with */
    uint8_t *bytes;             /* byte_len bytes */
    const qcow2_refcount_codec *codec;
} refblock_span;

/* ---- refcount_scan.c ---------------------------------------------------- */
/* A span over entries [first, first+count) of the block at block_offset,
 * stored in `bytes` (at least 8 + count * bits / 8 bytes). */
void alloc_span_init(const qcow2_image *img, uint64_t block_offset,
                     uint64_t first, uint64_t count, uint8_t *bytes,
                     refblock_span *span);
uint64_t alloc_span_get(const refblock_span *span, uint64_t entry);
void alloc_span_set(refblock_span *span, uint64_t entry, uint64_t value);
int alloc_span_load(qcow2_image *img, refblock_span *span);
/* The refcount block of reftable entry `index` (0: none, or past the
 * table), validated before use. */
int alloc_refblock_at(qcow2_image *img, uint64_t index, uint64_t *block);
/* The last host cluster an entry can name (56-bit offsets). */
uint64_t alloc_max_host_cluster(const qcow2_image *img);
/* First fit: the first run of `count` clusters with refcount 0 at or
 * after *from, which ends just past the run. */
int alloc_find_free_run(qcow2_image *img, uint64_t *from, uint64_t count,
                        uint64_t *start);

#endif
