/*
 * Safe rebase's copy-in (QEMU 7.2's img_rebase): before the backing name
 * changes, every sector the image does not allocate itself and whose
 * bytes through the current chain differ from the new chain's is written
 * into the image with the current chain's bytes. Those are ordinary guest
 * writes of the bytes the guest already reads, so a crash at any point
 * leaves an image reading the same; the switch (amend.c) comes after a
 * flush. chain.c opens the new backing and switches.
 *
 * The disk is walked in windows: the image's own map of a window is
 * collected first (a map callback must not write), then each range it
 * does not allocate is compared chunk by chunk. Memory: two chunks and
 * the extents of one window.
 */
#include <stdlib.h>
#include <string.h>

#include "chain_ops.h"

#define WINDOW  ((uint64_t)32 << 20)    /* guest bytes mapped at a time */
#define CHUNK   ((size_t)1 << 20)       /* compared at a time */
#define SECTOR  512u

typedef struct range_list {
    uint64_t *start;
    uint64_t *length;
    size_t count, cap;
    int nomem;
} range_list;

static int add_range(range_list *l, uint64_t start, uint64_t length)
{
    if (l->count && l->start[l->count - 1] + l->length[l->count - 1] ==
                    start) {
        l->length[l->count - 1] += length;
        return 0;
    }
    if (l->count == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        uint64_t *s = realloc(l->start, cap * sizeof *s);
        if (s)
            l->start = s;
        uint64_t *n = s ? realloc(l->length, cap * sizeof *n) : NULL;
        if (!n) {
            l->nomem = 1;
            return 1;
        }
        l->length = n;
        l->cap = cap;
    }
    l->start[l->count] = start;
    l->length[l->count] = length;
    l->count++;
    return 0;
}

/* Ranges the image does not hold itself: they show the backing chain. */
static int collect_unowned(void *ctx, const qcow2_extent *e)
{
    if (e->depth == 0 && e->type != QCOW2_EXTENT_UNALLOCATED)
        return 0;
    return add_range(ctx, e->start, e->length);
}

/* The new chain's bytes: zeroes without one or past its end. */
static int read_new(qcow2_image *img, qcow2_image *nb, uint64_t at,
                    uint8_t *buf, size_t n)
{
    size_t have = 0;
    int rc = 0;

    if (nb && at < nb->size)
        have = (size_t)(nb->size - at < n ? nb->size - at : n);
    if (have) {
        rc = qcow2_read(nb, at, buf, have);
        if (rc < 0)
            return qcow2_fail(img, rc, "new backing file: %s",
                              qcow2_errmsg(nb));
    }
    memset(buf + have, 0, n - have);
    return 0;
}

/* Bytes from guest offset at to the next guest sector boundary, at most
 * left: differences are found per sector, as qemu-img compares. */
static size_t unit(uint64_t at, size_t left)
{
    size_t u = SECTOR - (size_t)(at % SECTOR);
    return u < left ? u : left;
}

/* One range the image does not hold: the current chain's bytes written
 * over every run of differing sectors. */
static int copy_range(qcow2_image *img, qcow2_image *nb, uint64_t start,
                      uint64_t length, uint8_t *old, uint8_t *neu)
{
    uint64_t end = start + length;
    int rc = 0;

    for (uint64_t at = start; rc == 0 && at < end;) {
        size_t n = (size_t)(end - at < CHUNK ? end - at : CHUNK);
        rc = qcow2_read(img, at, old, n);
        if (rc == 0)
            rc = read_new(img, nb, at, neu, n);
        for (size_t i = 0; rc == 0 && i < n;) {
            size_t u = unit(at + i, n - i), j;
            if (memcmp(old + i, neu + i, u) == 0) {
                i += u;
                continue;
            }
            for (j = i + u; j < n; j += u) {
                u = unit(at + j, n - j);
                if (memcmp(old + j, neu + j, u) == 0)
                    break;
            }
            rc = qcow2_write(img, at + i, old + i, j - i);
            i = j;
        }
        at += n;
    }
    return rc;
}

int qcow2_rebase_copy(qcow2_image *img, qcow2_image *new_backing)
{
    uint8_t *old = malloc(CHUNK), *neu = malloc(CHUNK);
    range_list l = { NULL, NULL, 0, 0, 0 };
    int rc = old && neu ? 0 : qcow2_fail(img, QCOW2_E_NOMEM,
                                         "out of memory");

    for (uint64_t w = 0; rc == 0 && w < img->size; w += WINDOW) {
        uint64_t n = img->size - w < WINDOW ? img->size - w : WINDOW;
        l.count = 0;
        rc = qcow2_map(img, w, n, collect_unowned, &l);
        if (rc > 0 || l.nomem)
            rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        for (size_t i = 0; rc == 0 && i < l.count; i++)
            rc = copy_range(img, new_backing, l.start[i], l.length[i], old,
                            neu);
    }
    if (rc == 0)
        rc = qcow2_flush(img);
    free(l.start);
    free(l.length);
    free(old);
    free(neu);
    return rc;
}
