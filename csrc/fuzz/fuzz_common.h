/*
 * Shared by the libFuzzer harnesses (one harness per .c file): the fuzz
 * input is the image file, opened on the memory backend, so nothing on
 * disk is read or written and no backing file or data file is followed.
 * Static helpers only: no state survives an input.
 */
#ifndef QCOW2_FUZZ_COMMON_H
#define QCOW2_FUZZ_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "../qcow2.h"

/* Bounds that keep one input fast whatever sizes the image claims. */
#define FUZZ_READ_CAP   (8ull << 20)    /* guest bytes read from the start */
#define FUZZ_CHUNK      (65536 + 512 + 3) /* odd: unaligned chunk edges */
#define FUZZ_MAP_CAP    (1ull << 32)    /* guest bytes mapped from the start */
#define FUZZ_MAX_EXTENTS 100000
#define FUZZ_MAX_VIEWS  8

/* The input as an image: read-only, or read-write (repair: as check -r
 * opens it). NULL when the engine refuses it (a normal outcome). */
static inline qcow2_image *fuzz_open(const uint8_t *data, size_t size,
                                     int read_write, int repair)
{
    qcow2_open_opts opts;
    qcow2_image *img = NULL;
    qcow2_error err;

    qcow2_open_opts_init(&opts);
    opts.read_write = read_write;
    opts.repair = repair;
    opts.no_backing = 1;
    /* small caches: evictions are exercised on small inputs too */
    opts.l2_cache_size = 4096;
    opts.refcount_cache_size = 4096;
    if (qcow2_open_memory(data, size, &opts, &img, &err) < 0)
        return NULL;
    return img;
}

static inline uint64_t fuzz_min(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

/* Guest reads over a fixed pattern: the start of the disk in odd-sized
 * chunks, then a few spots near the middle and the end. Failures are
 * normal (corrupt entries); each read stands alone. */
static inline void fuzz_read_pattern(qcow2_image *img, uint8_t *buf,
                                     size_t buf_len)
{
    uint64_t size = qcow2_virtual_size(img);
    uint64_t end = fuzz_min(size, FUZZ_READ_CAP);
    uint64_t spots[4];

    for (uint64_t off = 0; off < end; off += buf_len) {
        size_t n = (size_t)fuzz_min(buf_len, end - off);

        (void)qcow2_read(img, off, buf, n);
    }
    spots[0] = size / 2;
    spots[1] = size > 4096 ? size - 4096 : 0;
    spots[2] = size > 1 ? size - 1 : 0;
    spots[3] = size > (1ull << 30) ? (1ull << 30) - 100 : 0;
    for (size_t i = 0; i < sizeof spots / sizeof spots[0]; i++) {
        uint64_t n = fuzz_min(fuzz_min(4096, buf_len), size - spots[i]);

        if (spots[i] < size)
            (void)qcow2_read(img, spots[i], buf, (size_t)n);
    }
}

/* Extents must come in order, without gaps, inside the range asked for. */
typedef struct fuzz_map_state {
    uint64_t next;
    uint64_t count;
} fuzz_map_state;

static inline int fuzz_map_cb(void *ctx, const qcow2_extent *e)
{
    fuzz_map_state *st = ctx;

    if (e->start != st->next || e->length == 0)
        abort();    /* a broken map: the fuzzer reports it as a crash */
    st->next = e->start + e->length;
    return ++st->count >= FUZZ_MAX_EXTENTS;
}

static inline void fuzz_map(qcow2_image *img, uint64_t length)
{
    fuzz_map_state st = { 0, 0 };

    (void)qcow2_map(img, 0, fuzz_min(length, qcow2_virtual_size(img)),
                    fuzz_map_cb, &st);
}

#endif /* QCOW2_FUZZ_COMMON_H */
