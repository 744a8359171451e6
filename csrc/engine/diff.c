/*
 * Guest ranges that differ between two images or views (an operation,
 * layer 8): the maps first, bytes only where both sides hold data.
 *
 * Each side's guest range is resolved down its backing chain to what
 * really provides the bytes: zeroes (zero flag, unallocated to the bottom
 * of the chain, or past the side's virtual size: qemu-img compare's rule
 * for a shorter image), a data cluster in some file at some host offset,
 * or a compressed stream. Two sides resolving to zeroes, or to the same
 * host bytes of the same file (a snapshot sharing clusters with the
 * active disk, two overlays on one backing image), are equal without a
 * read. Only where that fails are bytes read: one side against zeroes, or
 * both sides against each other, a bounded chunk at a time.
 *
 * Precision: 512-byte sectors. A sector is reported when any byte in it
 * differs; reported ranges are sector aligned (the last one ends at the
 * larger virtual size) and adjacent ones are merged.
 *
 * qcow2_diff_unproven is the first half alone, over a part of the disk:
 * the ranges the maps cannot prove equal, nothing read (safe rebase
 * compares only those).
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "cluster.h"

#define DIFF_SECTOR     512u
#define DIFF_CHUNK      ((uint64_t)1 << 20)     /* bytes read per side */

enum seg_kind { SEG_ZERO, SEG_DATA, SEG_COMPRESSED };

/* What provides one side's guest bytes [start, start + length). */
typedef struct segment {
    uint64_t start, length;     /* length 0: not resolved yet */
    int kind;                   /* enum seg_kind */
    const qcow2_io *io;         /* DATA, COMPRESSED: the file */
    uint64_t host;              /* DATA: host offset of start;
                                   COMPRESSED: the stream's offset */
    uint64_t intra;             /* COMPRESSED: start's offset in the
                                   decompressed cluster */
} segment;

typedef struct side {
    qcow2_image *top;
    segment seg;
    uint8_t *buf;               /* DIFF_CHUNK bytes, allocated on need */
} side;

typedef struct diff_state {
    qcow2_image *a;             /* failures are reported on a */
    side s[2];
    uint64_t begin;             /* where the walk starts */
    uint64_t total;             /* where it ends: the larger virtual size,
                                   or the end of the range asked about */
    int maps_only;              /* report what the maps cannot prove */
    qcow2_range_fn fn;
    void *ctx;
    uint64_t pend_start, pend_end;  /* a differing range being merged */
    qcow2_diff_stats *stats;
} diff_state;

/* ---- Resolving a side --------------------------------------------------- */

/* A failure on another handle (a backing level, the other side) is
 * reported on the handle the call was made on. */
static int failed_on(diff_state *ds, qcow2_image *where, int rc)
{
    if (where != ds->a) {
        ds->a->err = where->err;
        if (ds->a->err.code == 0)
            ds->a->err.code = rc;
    }
    return rc;
}

static uint64_t level_length(const qcow2_image *img)
{
    return img->is_raw ? align_up(img->size, DIFF_SECTOR) : img->size;
}

/* The segment of side sd starting at guest offset g, at most max bytes. */
static int resolve(diff_state *ds, side *sd, uint64_t g, uint64_t max)
{
    segment *seg = &sd->seg;
    qcow2_image *level = sd->top;
    qcow2_run run;
    int rc;

    memset(seg, 0, sizeof *seg);
    seg->start = g;
    seg->kind = SEG_ZERO;
    if (g >= sd->top->size) {           /* the shorter side reads zeroes */
        seg->length = max;
        return 0;
    }
    max = min_u64(max, sd->top->size - g);
    for (int depth = 0; depth <= QCOW2_MAX_CHAIN_DEPTH; depth++) {
        if (level->is_raw) {
            seg->kind = SEG_DATA;
            seg->io = level->io;
            seg->host = g;
            break;
        }
        rc = qcow2_lookup_run(level, g, max, &run);
        if (rc < 0)
            return failed_on(ds, level, rc);
        max = run.length;
        if (run.type == SC_NORMAL) {
            seg->kind = SEG_DATA;
            seg->io = level->data_io;
            seg->host = run.host_offset;
            break;
        }
        if (run.type == SC_COMPRESSED) {
            seg->kind = SEG_COMPRESSED;
            seg->io = level->io;
            seg->host = run.host_offset;
            seg->intra = g - run.cluster_offset;
            break;
        }
        if (run.type != SC_ZERO_PLAIN && run.type != SC_ZERO_ALLOC &&
            !sc_type_is_unallocated(run.type))
            return qcow2_fail(ds->a, QCOW2_E_CORRUPT, "guest offset 0x%"
                              PRIx64 ": unknown cluster state %d in %s", g,
                              run.type, level->path ? level->path : "?");
        if (!sc_type_is_unallocated(run.type) || !level->backing ||
            g >= level_length(level->backing))
            break;                      /* zeroes */
        max = min_u64(max, level_length(level->backing) - g);
        level = level->backing;
    }
    seg->length = max;
    return 0;
}

/* ---- Comparing -------------------------------------------------------------- */

static int same_file(const qcow2_io *x, const qcow2_io *y)
{
    if (x == y)
        return 1;
    return x && y && x->ino != 0 && x->dev == y->dev && x->ino == y->ino;
}

/* Equal from the maps alone, for the n bytes at g of both segments. */
static int equal_by_map(const segment *x, const segment *y, uint64_t g)
{
    if (x->kind != y->kind)
        return 0;
    switch (x->kind) {
    case SEG_ZERO:
        return 1;
    case SEG_DATA:
        return same_file(x->io, y->io) &&
               x->host + (g - x->start) == y->host + (g - y->start);
    default:
        return same_file(x->io, y->io) && x->host == y->host &&
               x->intra + (g - x->start) == y->intra + (g - y->start);
    }
}

static int flush_pending(diff_state *ds)
{
    uint64_t start = ds->pend_start, end = ds->pend_end;

    if (end == start)
        return 0;
    ds->pend_start = ds->pend_end = 0;
    return ds->fn(ds->ctx, start, end - start);
}

/* Guest bytes [start, end) differ: report their covering sectors, merged
 * with the range before them when they touch. */
static int differs(diff_state *ds, uint64_t start, uint64_t end)
{
    start = max_u64(start - start % DIFF_SECTOR, ds->begin);
    end = min_u64(align_up(end, DIFF_SECTOR), ds->total);
    if (ds->pend_end != ds->pend_start && start <= ds->pend_end) {
        ds->pend_end = max_u64(ds->pend_end, end);
        return 0;
    }
    {
        int rc = flush_pending(ds);
        if (rc != 0)
            return rc;
    }
    ds->pend_start = start;
    ds->pend_end = end;
    return 0;
}


/* Guest bytes of one side into its buffer (NULL: the side reads zeroes). */
static int side_bytes(diff_state *ds, side *sd, uint64_t g, size_t n,
                      const uint8_t **out)
{
    int rc;

    *out = NULL;
    if (sd->seg.kind == SEG_ZERO)
        return 0;
    if (!sd->buf) {
        sd->buf = malloc(DIFF_CHUNK);
        if (!sd->buf)
            return qcow2_fail(ds->a, QCOW2_E_NOMEM, "out of memory");
    }
    rc = qcow2_read(sd->top, g, sd->buf, n);
    if (rc < 0)
        return failed_on(ds, sd->top, rc);
    if (ds->stats)
        ds->stats->bytes_read += n;
    *out = sd->buf;
    return 0;
}

/* Bytes [g, g + n) (n <= DIFF_CHUNK), sector by sector. */
static int compare_chunk(diff_state *ds, uint64_t g, size_t n)
{
    const uint8_t *x, *y;
    uint64_t pos = g, end = g + n;
    int rc;

    rc = side_bytes(ds, &ds->s[0], g, n, &x);
    if (rc == 0)
        rc = side_bytes(ds, &ds->s[1], g, n, &y);
    if (rc < 0)
        return rc;
    if (x && y && memcmp(x, y, n) == 0)
        return 0;
    while (pos < end) {
        uint64_t piece_end = min_u64(end, pos - pos % DIFF_SECTOR +
                                          DIFF_SECTOR);
        size_t at = (size_t)(pos - g), len = (size_t)(piece_end - pos);
        int same = x && y ? memcmp(x + at, y + at, len) == 0
                          : bytes_all_zero(x ? x + at : y + at, len);
        if (!same) {
            rc = differs(ds, pos, piece_end);
            if (rc != 0)
                return rc;
        }
        pos = piece_end;
    }
    return 0;
}

static int compare_segment(diff_state *ds, uint64_t g, uint64_t n)
{
    uint64_t end = g + n;
    int rc;

    if (equal_by_map(&ds->s[0].seg, &ds->s[1].seg, g)) {
        if (ds->stats)
            ds->stats->bytes_by_map += n;
        return 0;
    }
    if (ds->maps_only)
        return differs(ds, g, end);
    while (g < end) {
        size_t len = (size_t)min_u64(end - g, DIFF_CHUNK);
        rc = compare_chunk(ds, g, len);
        if (rc != 0)
            return rc;
        g += len;
    }
    return 0;
}

static int diff_run(diff_state *ds)
{
    uint64_t g = ds->begin;
    int rc;

    while (g < ds->total) {
        uint64_t n = ds->total - g;
        for (int i = 0; i < 2; i++) {
            segment *seg = &ds->s[i].seg;
            if (seg->length == 0 || seg->start + seg->length <= g) {
                rc = resolve(ds, &ds->s[i], g, ds->total - g);
                if (rc < 0)
                    return rc;
                if (seg->length == 0)
                    return qcow2_fail(ds->a, QCOW2_E_CORRUPT,
                                      "guest offset 0x%" PRIx64
                                      ": empty extent", g);
            }
            n = min_u64(n, seg->start + seg->length - g);
        }
        rc = compare_segment(ds, g, n);
        if (rc != 0)
            return rc;
        g += n;
    }
    return flush_pending(ds);
}

static int diff_work(qcow2_image *a, qcow2_image *b, qcow2_range_fn fn,
                     void *ctx, qcow2_diff_stats *stats)
{
    diff_state ds;
    int rc;

    memset(&ds, 0, sizeof ds);
    if (stats)
        memset(stats, 0, sizeof *stats);
    ds.a = a;
    ds.s[0].top = a;
    ds.s[1].top = b;
    ds.total = max_u64(a->size, b->size);
    ds.fn = fn;
    ds.ctx = ctx;
    ds.stats = stats;
    rc = diff_run(&ds);
    free(ds.s[0].buf);
    free(ds.s[1].buf);
    return rc;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_diff(qcow2_image *a, qcow2_image *b, qcow2_range_fn fn, void *ctx,
               qcow2_diff_stats *stats)
{
    int rc = qcow2_meta_flush(a);

    if (rc == 0)
        rc = qcow2_meta_flush(b);
    return rc < 0 ? rc : diff_work(a, b, fn, ctx, stats);
}

int qcow2_diff_unproven(qcow2_image *a, qcow2_image *b, uint64_t start,
                        uint64_t length, qcow2_range_fn fn, void *ctx)
{
    diff_state ds;

    memset(&ds, 0, sizeof ds);
    ds.a = a;
    ds.s[0].top = a;
    ds.s[1].top = b;
    ds.begin = start;
    ds.total = start + length;
    ds.maps_only = 1;
    ds.fn = fn;
    ds.ctx = ctx;
    return diff_run(&ds);
}
