/*
 * The refcount-entry codec (format layer): how entry i of a refcount block
 * is stored, for every width the format allows (refcount_order 0..6, 1 to
 * 64 bits; docs 4.2). Chosen once per image from refcount_order, as QEMU's
 * get_refcount_funcs[] is, so no caller ever looks at the width to pack or
 * unpack an entry. Pure functions over a byte buffer: no I/O, no state.
 */
#ifndef QCOW2_REFCOUNT_CODEC_H
#define QCOW2_REFCOUNT_CODEC_H

#include <stddef.h>
#include <stdint.h>

#define QCOW2_REFCOUNT_ORDER_MAX 6

typedef struct qcow2_refcount_codec {
    uint32_t order;             /* refcount_order */
    uint32_t bits;              /* 1 << order */
    uint64_t max;               /* the largest refcount an entry holds */
    /* Entry `index` of `bytes`, where bytes[0] holds entry 0. */
    uint64_t (*get)(const uint8_t *bytes, uint64_t index);
    /* Store `value` (at most max; wider bits are dropped) as entry
     * `index`, leaving the entries that share its byte untouched. */
    void (*set)(uint8_t *bytes, uint64_t index, uint64_t value);
} qcow2_refcount_codec;

/* The codec of refcount_order (NULL past QCOW2_REFCOUNT_ORDER_MAX). */
const qcow2_refcount_codec *qcow2_refcount_codec_for(uint32_t order);

/*
 * The bytes that hold entries [first, first+count) (count >= 1) of a
 * refcount block: [*byte_start, *byte_start + *byte_len). Entry e of the
 * range is entry e - *first_in_bytes of a buffer holding just those bytes.
 */
void qcow2_refcount_codec_bytes(const qcow2_refcount_codec *codec,
                                uint64_t first, uint64_t count,
                                uint64_t *byte_start, size_t *byte_len,
                                uint64_t *first_in_bytes);

#endif
