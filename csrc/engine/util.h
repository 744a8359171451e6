/*
 * The dull, dangerous helpers in one place: big-endian loads and stores,
 * overflow-checked arithmetic and range checks. A bounds check written
 * inline twice is a bug waiting for its third copy: use these.
 */
#ifndef QCOW2_UTIL_H
#define QCOW2_UTIL_H

#include <stdint.h>
#include <string.h>
#include <stddef.h>

static inline uint16_t be16(const void *p)
{
    const uint8_t *b = p;
    return (uint16_t)((b[0] << 8) | b[1]);
}

static inline uint32_t be32(const void *p)
{
    const uint8_t *b = p;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) |
           ((uint32_t)b[2] << 8) | b[3];
}

static inline uint64_t be64(const void *p)
{
    const uint8_t *b = p;
    return ((uint64_t)be32(b) << 32) | be32(b + 4);
}

static inline void put_be16(void *p, uint16_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 8);
    b[1] = (uint8_t)v;
}

static inline void put_be32(void *p, uint32_t v)
{
    uint8_t *b = p;
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

static inline void put_be64(void *p, uint64_t v)
{
    put_be32(p, (uint32_t)(v >> 32));
    put_be32((uint8_t *)p + 4, (uint32_t)v);
}

/* 1 on overflow, else *out = a + b. */
static inline int add_overflows(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_add_overflow(a, b, out);
}

/* 1 on overflow, else *out = a * b. */
static inline int mul_overflows(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_mul_overflow(a, b, out);
}

/* 1 when [offset, offset+length) lies inside [0, limit) without overflow. */
static inline int range_inside(uint64_t offset, uint64_t length,
                               uint64_t limit)
{
    uint64_t end;
    return !add_overflows(offset, length, &end) && end <= limit;
}

/* 1 when two half-open ranges share a byte. */
static inline int ranges_overlap(uint64_t a, uint64_t a_len,
                                 uint64_t b, uint64_t b_len)
{
    if (a_len == 0 || b_len == 0)
        return 0;
    return a < b + b_len && b < a + a_len;   /* callers pass checked ranges */
}

static inline int is_aligned(uint64_t value, uint64_t alignment)
{
    return (value & (alignment - 1)) == 0;   /* alignment: a power of two */
}

static inline uint64_t align_up(uint64_t value, uint64_t alignment)
{
    return (value + alignment - 1) & ~(alignment - 1);
}

static inline uint64_t div_round_up(uint64_t value, uint64_t divisor)
{
    return value / divisor + (value % divisor != 0);
}

static inline uint64_t min_u64(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

static inline uint64_t max_u64(uint64_t a, uint64_t b)
{
    return a > b ? a : b;
}

/* n bytes at p are all zero (memcmp against itself shifted by one). */
static inline int bytes_all_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

#endif /* QCOW2_UTIL_H */
