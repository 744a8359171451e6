/*
 * Refcount-entry codec: one get/set pair per refcount_order (docs 4.2).
 * Widths below a byte share bytes, least-significant bits first; 8 to 64
 * bits are big-endian integers at byte index * bits / 8.
 */
#include "refcount_codec.h"
#include "util.h"

/* 1, 2 and 4 bits: entry i sits in byte i / (8 / bits), shifted left by
 * (i % (8 / bits)) * bits. */
static uint64_t get_sub_byte(const uint8_t *bytes, uint64_t index,
                             uint32_t bits)
{
    uint32_t per_byte = 8 / bits;
    uint32_t shift = (uint32_t)(index % per_byte) * bits;

    return (uint64_t)(bytes[index / per_byte] >> shift) & ((1u << bits) - 1);
}

static void set_sub_byte(uint8_t *bytes, uint64_t index, uint64_t value,
                         uint32_t bits)
{
    uint32_t per_byte = 8 / bits;
    uint32_t shift = (uint32_t)(index % per_byte) * bits;
    uint8_t mask = (uint8_t)(((1u << bits) - 1) << shift);
    uint8_t *byte = &bytes[index / per_byte];

    *byte = (uint8_t)((*byte & ~mask) | ((value << shift) & mask));
}

static uint64_t get_order0(const uint8_t *b, uint64_t i)
{
    return get_sub_byte(b, i, 1);
}

static uint64_t get_order1(const uint8_t *b, uint64_t i)
{
    return get_sub_byte(b, i, 2);
}

static uint64_t get_order2(const uint8_t *b, uint64_t i)
{
    return get_sub_byte(b, i, 4);
}

static uint64_t get_order3(const uint8_t *b, uint64_t i)
{
    return b[i];
}

static uint64_t get_order4(const uint8_t *b, uint64_t i)
{
    return be16(b + i * 2);
}

static uint64_t get_order5(const uint8_t *b, uint64_t i)
{
    return be32(b + i * 4);
}

static uint64_t get_order6(const uint8_t *b, uint64_t i)
{
    return be64(b + i * 8);
}

static void set_order0(uint8_t *b, uint64_t i, uint64_t v)
{
    set_sub_byte(b, i, v, 1);
}

static void set_order1(uint8_t *b, uint64_t i, uint64_t v)
{
    set_sub_byte(b, i, v, 2);
}

static void set_order2(uint8_t *b, uint64_t i, uint64_t v)
{
    set_sub_byte(b, i, v, 4);
}

static void set_order3(uint8_t *b, uint64_t i, uint64_t v)
{
    b[i] = (uint8_t)v;
}

static void set_order4(uint8_t *b, uint64_t i, uint64_t v)
{
    put_be16(b + i * 2, (uint16_t)v);
}

static void set_order5(uint8_t *b, uint64_t i, uint64_t v)
{
    put_be32(b + i * 4, (uint32_t)v);
}

static void set_order6(uint8_t *b, uint64_t i, uint64_t v)
{
    put_be64(b + i * 8, v);
}

static const qcow2_refcount_codec codecs[QCOW2_REFCOUNT_ORDER_MAX + 1] = {
    { 0, 1, 0x1, get_order0, set_order0 },
    { 1, 2, 0x3, get_order1, set_order1 },
    { 2, 4, 0xf, get_order2, set_order2 },
    { 3, 8, 0xff, get_order3, set_order3 },
    { 4, 16, 0xffff, get_order4, set_order4 },
    { 5, 32, 0xffffffffull, get_order5, set_order5 },
    { 6, 64, UINT64_MAX, get_order6, set_order6 },
};

const qcow2_refcount_codec *qcow2_refcount_codec_for(uint32_t order)
{
    return order <= QCOW2_REFCOUNT_ORDER_MAX ? &codecs[order] : NULL;
}

void qcow2_refcount_codec_bytes(const qcow2_refcount_codec *codec,
                                uint64_t first, uint64_t count,
                                uint64_t *byte_start, size_t *byte_len,
                                uint64_t *first_in_bytes)
{
    uint32_t bits = codec->bits;

    if (bits < 8) {
        uint64_t per_byte = 8 / bits;
        *byte_start = first / per_byte;
        *byte_len = (size_t)((first + count - 1) / per_byte + 1 -
                             *byte_start);
        *first_in_bytes = *byte_start * per_byte;
    } else {
        *byte_start = first * (bits / 8);
        *byte_len = (size_t)(count * (bits / 8));
        *first_in_bytes = first;
    }
}
