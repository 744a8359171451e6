/*
 * Commit's copy-out (qemu-img commit, QEMU's commit job): what the image
 * allocates itself, and only that, written into its backing file. Data
 * and compressed clusters carry their guest bytes over; zero clusters
 * become zero writes (the backing file must read zero there too). The
 * backing file grows to the image's size first, as QEMU's commit grows
 * its base. Flushed at the end: chain.c empties the image only then.
 *
 * Windows of the image's own map are collected first (a map callback must
 * not write), then copied a chunk at a time. Memory: one chunk and the
 * extents of one window.
 */
#include <stdlib.h>
#include <string.h>

#include "chain_ops.h"

#define WINDOW  ((uint64_t)32 << 20)
#define CHUNK   ((size_t)1 << 20)

typedef struct own_extent {
    uint64_t start;
    uint64_t length;
    int zero;
} own_extent;

typedef struct own_list {
    own_extent *e;
    size_t count, cap;
} own_list;

/* The extents the image holds itself (depth 0). */
static int collect_own(void *ctx, const qcow2_extent *e)
{
    own_list *l = ctx;

    if (e->depth != 0 || e->type == QCOW2_EXTENT_UNALLOCATED)
        return 0;
    if (l->count == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        own_extent *grown = realloc(l->e, cap * sizeof *grown);
        if (!grown)
            return 1;
        l->e = grown;
        l->cap = cap;
    }
    l->e[l->count].start = e->start;
    l->e[l->count].length = e->length;
    l->e[l->count].zero = e->type == QCOW2_EXTENT_ZERO;
    l->count++;
    return 0;
}

/* base's failure, named on img. */
static int base_failed(qcow2_image *img, qcow2_image *base, int rc)
{
    return qcow2_fail(img, rc, "backing file: %s", qcow2_errmsg(base));
}

/* A raw base grows by truncation; qcow2 by its resize. */
static int grow_base(qcow2_image *img, qcow2_image *base)
{
    int rc;

    if (base->size >= img->size)
        return 0;
    if (!base->is_raw) {
        rc = qcow2_resize(base, img->size);
        return rc < 0 ? base_failed(img, base, rc) : 0;
    }
    rc = base->io->ops->truncate(base->io, img->size);
    if (rc < 0)
        return qcow2_fail(img, rc, "backing file: cannot grow it to %llu "
                          "bytes", (unsigned long long)img->size);
    base->size = img->size;
    base->file_size = img->size;
    return 0;
}

static int copy_extent(qcow2_image *img, qcow2_image *base,
                       const own_extent *e, uint8_t *buf)
{
    uint64_t end = e->start + e->length;
    int rc = 0;

    if (e->zero) {
        rc = qcow2_write_zeroes(base, e->start, e->length, 0);
        return rc < 0 ? base_failed(img, base, rc) : 0;
    }
    for (uint64_t at = e->start; rc == 0 && at < end;) {
        size_t n = (size_t)(end - at < CHUNK ? end - at : CHUNK);
        rc = qcow2_read(img, at, buf, n);
        if (rc == 0 && (rc = qcow2_write(base, at, buf, n)) < 0)
            rc = base_failed(img, base, rc);
        at += n;
    }
    return rc;
}

int qcow2_commit_copy(qcow2_image *img, qcow2_image *base)
{
    uint8_t *buf = malloc(CHUNK);
    own_list l = { NULL, 0, 0 };
    int rc = buf ? grow_base(img, base)
                 : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");

    for (uint64_t w = 0; rc == 0 && w < img->size; w += WINDOW) {
        uint64_t n = img->size - w < WINDOW ? img->size - w : WINDOW;
        l.count = 0;
        rc = qcow2_map(img, w, n, collect_own, &l);
        if (rc > 0)
            rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        for (size_t i = 0; rc == 0 && i < l.count; i++)
            rc = copy_extent(img, base, &l.e[i], buf);
    }
    if (rc == 0 && (rc = qcow2_flush(base)) < 0)
        rc = base_failed(img, base, rc);
    free(l.e);
    free(buf);
    return rc;
}
