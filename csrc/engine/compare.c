/*
 * qemu-img compare (an operation, layer 8): the first guest sector where
 * two images or views differ, built on the diff engine (maps first, bytes
 * only where both sides hold data).
 *
 * Strict mode adds qemu-img's two extra rules: a size mismatch is a
 * difference, and so is a block status mismatch. qemu-img asks both
 * sides for their status at every chunk boundary and compares the flag
 * words (allocated, zero, data, compressed, EOF); the first chunk whose
 * words differ ends the comparison at its start, before its bytes are
 * compared. The flags come here from the map (qcow2_map): the chunk
 * boundaries are the union of both maps' extent boundaries, and a
 * status carries QEMU's EOF bit when its run reaches the side's end from
 * inside the last L2 table's span (QEMU's runs stop at L2 boundaries).
 */
#include <inttypes.h>
#include <string.h>

#include "ops.h"

/* The side's length as qemu-img sees it: a raw file rounded up to whole
 * sectors (bdrv_getlength). */
static uint64_t side_length(const qcow2_image *img)
{
    return img->is_raw ? align_up(img->size, 512) : img->size;
}

/* ---- Content: the first range the diff engine reports ------------------- */

typedef struct first_range {
    int found;
    uint64_t start;
} first_range;

static int stop_at_first(void *ctx, uint64_t start, uint64_t length)
{
    first_range *f = ctx;

    (void)length;
    f->found = 1;
    f->start = start;
    return 1;
}

static int first_difference(qcow2_image *a, qcow2_image *b, int *found,
                            uint64_t *offset)
{
    first_range f = { 0, 0 };
    int rc = qcow2_diff(a, b, stop_at_first, &f, NULL);

    if (rc < 0)
        return rc;
    *found = f.found;
    *offset = f.start;
    return 0;
}

/* ---- Block status: the map's extent at an offset, as QEMU's flags ------- */

enum {
    ST_ALLOCATED = 1, ST_ZERO = 2, ST_DATA = 4, ST_COMPRESSED = 8,
    ST_EOF = 16
};

typedef struct status_probe {
    qcow2_extent e;
    int got;
} status_probe;

static int take_first(void *ctx, const qcow2_extent *e)
{
    status_probe *p = ctx;

    p->e = *e;
    p->e.reason = NULL;
    p->got = 1;
    return 1;
}

/* The flags of side img at guest offset g, and where its run ends. */
static int status_at(qcow2_image *img, uint64_t g, unsigned *flags,
                     uint64_t *end)
{
    uint64_t length = side_length(img), coverage;
    status_probe p;
    int rc;

    memset(&p, 0, sizeof p);
    rc = qcow2_map(img, g, length - g, take_first, &p);
    if (rc < 0)
        return rc;
    if (!p.got || p.e.length == 0)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "guest offset 0x%" PRIx64
                          ": the map gives no extent", g);
    switch (p.e.type) {
    case QCOW2_EXTENT_DATA:
        *flags = ST_ALLOCATED | ST_DATA | (p.e.reads_zero ? ST_ZERO : 0);
        break;
    case QCOW2_EXTENT_ZERO:
        *flags = ST_ALLOCATED | ST_ZERO;
        break;
    case QCOW2_EXTENT_COMPRESSED:
        *flags = ST_ALLOCATED | ST_DATA | ST_COMPRESSED;
        break;
    case QCOW2_EXTENT_UNALLOCATED:
        *flags = ST_ZERO;
        break;
    default:
        return qcow2_fail(img, QCOW2_E_CORRUPT, "guest offset 0x%" PRIx64
                          ": %s", g, "metadata cannot be followed");
    }
    *end = p.e.start + p.e.length;
    coverage = img->is_raw ? length : qcow2_l2_coverage(img);
    if (*end >= length && (coverage == 0 || g / coverage ==
                           (length - 1) / coverage))
        *flags |= ST_EOF;
    return 0;
}

/* The first chunk start where the two sides' flags differ, over the
 * common length (strict mode: the sizes are equal). */
static int first_status_mismatch(qcow2_image *a, qcow2_image *b,
                                 int *found, uint64_t *offset)
{
    uint64_t length = side_length(a), g = 0;

    *found = 0;
    while (g < length) {
        unsigned fa, fb;
        uint64_t ea, eb;
        int rc = status_at(a, g, &fa, &ea);

        if (rc < 0)
            return rc;
        rc = status_at(b, g, &fb, &eb);
        if (rc < 0) {
            a->err = b->err;    /* reported on a, as the diff does */
            return rc;
        }
        if (fa != fb) {
            *found = 1;
            *offset = g;
            return 0;
        }
        g = min_u64(ea, eb);
    }
    return 0;
}

int qcow2_compare(qcow2_image *a, qcow2_image *b, int strict,
                  uint64_t *offset)
{
    int found_content = 0, found_status = 0, rc;
    uint64_t content = 0, status = 0;

    *offset = 0;
    if (strict && side_length(a) != side_length(b)) {
        *offset = min_u64(side_length(a), side_length(b));
        return QCOW2_COMPARE_SIZE;
    }
    rc = first_difference(a, b, &found_content, &content);
    if (rc == 0 && strict)
        rc = first_status_mismatch(a, b, &found_status, &status);
    if (rc < 0)
        return rc;
    /* qemu-img checks a chunk's status before its bytes: a status
     * mismatch at a chunk start comes first unless bytes differ before. */
    if (found_status && (!found_content || status <= content)) {
        *offset = status;
        return QCOW2_COMPARE_STATUS;
    }
    if (found_content) {
        *offset = content;
        return QCOW2_COMPARE_CONTENT;
    }
    return QCOW2_COMPARE_EQUAL;
}
