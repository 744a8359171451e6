/*
 * Commit's copy-out (qemu-img commit, QEMU's commit job): what the image
 * allocates itself, and only that, written into its backing file. Data
 * and compressed clusters carry their guest bytes over; zero clusters
 * become zero writes (the backing file must read zero there too). The
 * backing file grows to the image's size first, as QEMU's commit grows
 * its base. Flushed at the end: chain.c empties the image only then.
 *
 * The image's own lookups are walked (its L2 entries, not the chain's
 * map: what lies below is never asked about, no file holes are probed),
 * and each run of its own clusters is copied as soon as it is found
 * (writes go to base, so the image's tables stay as looked up). Runs of
 * one kind that touch are merged first, so a contiguous range is one
 * write however its host clusters lie. Memory: one chunk.
 */
#include <stdlib.h>
#include <string.h>

#include "chain_ops.h"

#define CHUNK   ((size_t)1 << 20)

/* A range the image holds itself, not yet copied. */
typedef struct own_extent {
    uint64_t start;
    uint64_t length;            /* 0: none pending */
    int zero;
} own_extent;

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

/* Merged into the pending range, or the pending range copied first. */
static int add_own(qcow2_image *img, qcow2_image *base, own_extent *p,
                   uint64_t start, uint64_t length, int zero, uint8_t *buf)
{
    int rc;

    if (p->length && p->zero == zero && p->start + p->length == start) {
        p->length += length;
        return 0;
    }
    rc = p->length ? copy_extent(img, base, p, buf) : 0;
    p->start = start;
    p->length = length;
    p->zero = zero;
    return rc;
}

int qcow2_commit_copy(qcow2_image *img, qcow2_image *base)
{
    uint8_t *buf = malloc(CHUNK);
    own_extent pend = { 0, 0, 0 };
    qcow2_run run;
    int rc = buf ? grow_base(img, base)
                 : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");

    for (uint64_t g = 0; rc == 0 && g < img->size; g += run.length) {
        rc = qcow2_lookup_run(img, g, img->size - g, &run);
        if (rc < 0)
            break;
        if (sc_type_is_unallocated(run.type))
            continue;
        rc = add_own(img, base, &pend, g, run.length,
                     run.type == SC_ZERO_PLAIN || run.type == SC_ZERO_ALLOC,
                     buf);
    }
    if (rc == 0 && pend.length)
        rc = copy_extent(img, base, &pend, buf);
    if (rc == 0 && (rc = qcow2_flush(base)) < 0)
        rc = base_failed(img, base, rc);
    free(buf);
    return rc;
}
