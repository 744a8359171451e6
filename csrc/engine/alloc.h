/*
 * What alloc.c shares with reftable_grow.c: spans of refcount-block
 * entries (read and written as the bytes that hold them), and two guards.
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

/* A span over entries [first, first+count) of the block at block_offset,
 * stored in `bytes` (at least 8 + count * bits / 8 bytes). */
void alloc_span_init(const qcow2_image *img, uint64_t block_offset,
                     uint64_t first, uint64_t count, uint8_t *bytes,
                     refblock_span *span);
uint64_t alloc_span_get(const refblock_span *span, uint64_t entry);
void alloc_span_set(refblock_span *span, uint64_t entry, uint64_t value);
int alloc_span_load(qcow2_image *img, refblock_span *span);
int alloc_span_store(qcow2_image *img, const refblock_span *span);
/* 0 for a writable handle, else the refusal. */
int alloc_need_write_state(qcow2_image *img);
/* The last host cluster an entry can name (56-bit offsets). */
uint64_t alloc_max_host_cluster(const qcow2_image *img);

#endif
