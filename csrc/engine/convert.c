/*
 * qemu-img convert (an operation, layer 8): a source disk (image, backing
 * chain or snapshot view) copied into a fresh image, in steps so that the
 * caller can report progress and stop between them.
 *
 * The output stays sparse, as qemu-img's does: the source's map finds
 * the next range holding data (unallocated and zero ranges are skipped
 * without a read), that range is read a chunk at a time, and inside the
 * chunk every unit (an output cluster; 4 KiB for raw output) that reads
 * as zeroes is left unwritten (qemu-img's zero detection). Non-zero units
 * are written in runs, one write per run.
 *
 * With `only_differences` the output's backing image is the reference
 * (qemu-img convert -B): the diff engine lists the sectors where source
 * and backing differ, and only the units holding them are written (zero
 * units as zero clusters, so that they hide the backing's bytes).
 *
 * Compressed output: a chunk's non-zero clusters are compressed on worker
 * threads (convert_pool.c), then written here in guest order, one L2
 * update per table touched; a cluster that does not shrink is written
 * plainly, as QEMU does.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "convert.h"

#define CONVERT_CHUNK       ((uint64_t)8 << 20)     /* bytes per step */
#define CONVERT_RAW_UNIT    4096u                   /* raw: hole grain */
#define CONVERT_MAP_WINDOW  ((uint64_t)16 << 30)    /* map looked at per step */

struct qcow2_convert {
    qcow2_image *src, *dst, *base;
    int compress, threads;
    uint64_t size;              /* guest bytes to convert (the source's) */
    uint64_t pos;               /* everything before is done */
    uint64_t unit;              /* zero-detection and write grain */
    uint64_t chunk;             /* bytes per step (a multiple of unit) */
    uint8_t *buf;               /* chunk bytes */
    uint8_t *zbuf;              /* compressed streams, one cluster each */
    qcow2_cjob *jobs;
    uint64_t *offsets;          /* guest offset of each job's cluster */
    uint64_t (*ranges)[2];      /* -B: unit-aligned ranges to write */
    size_t n_ranges, cap_ranges, at_range;
    int diffed, done, out_of_memory;
    qcow2_error err;
};

/* The failure of a call on h, kept in the converter (which is what the
 * caller asks for the message). */
static int failed(qcow2_convert *cv, qcow2_image *h, int rc)
{
    if (h && qcow2_errcode(h) != 0) {
        cv->err.code = rc;
        snprintf(cv->err.msg, sizeof cv->err.msg, "%s", qcow2_errmsg(h));
    } else if (cv->err.code == 0) {
        qcow2_error_set(&cv->err, rc, "convert: %s",
                        qcow2_status_name(rc));
    }
    return rc;
}

static int online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > 64 ? 64 : (int)n;
}

int qcow2_convert_begin(qcow2_image *src, qcow2_image *dst,
                        const qcow2_convert_opts *opts, qcow2_convert **out)
{
    qcow2_convert *cv;
    size_t clusters;

    *out = NULL;
    if (dst->read_only)
        return qcow2_fail(dst, QCOW2_E_READONLY, "convert: the output is "
                          "read-only");
    if (opts->compress && (dst->is_raw || qcow2_has_data_file(dst) ||
                           dst->hdr.crypt_method != CRYPT_NONE))
        return qcow2_fail(dst, QCOW2_E_UNSUPPORTED, "convert: compressed "
                          "output needs a qcow2 image without an external "
                          "data file or encryption");
    if (opts->only_differences && !dst->backing)
        return qcow2_fail(dst, QCOW2_E_INVALID, "convert: the output has no "
                          "open backing image to write differences from");
    if (dst->size < src->size)
        return qcow2_fail(dst, QCOW2_E_INVALID, "convert: the output (%"
                          PRIu64 " bytes) is smaller than the source (%"
                          PRIu64 " bytes)", dst->size, src->size);
    cv = calloc(1, sizeof *cv);
    if (!cv)
        return qcow2_fail(dst, QCOW2_E_NOMEM, "out of memory");
    cv->src = src;
    cv->dst = dst;
    cv->base = opts->only_differences ? dst->backing : NULL;
    cv->compress = opts->compress;
    cv->threads = opts->threads > 0 ? opts->threads : online_cpus();
    cv->size = src->size;
    cv->unit = dst->is_raw ? CONVERT_RAW_UNIT : dst->cluster_size;
    cv->chunk = align_up(CONVERT_CHUNK, cv->unit);
    cv->buf = malloc(cv->chunk);
    clusters = (size_t)(cv->chunk / cv->unit);
    if (cv->buf && cv->compress) {
        cv->zbuf = malloc(cv->chunk);
        cv->jobs = calloc(clusters, sizeof *cv->jobs);
        cv->offsets = calloc(clusters, sizeof *cv->offsets);
    }
    if (!cv->buf ||
        (cv->compress && (!cv->zbuf || !cv->jobs || !cv->offsets))) {
        qcow2_convert_free(cv);
        return qcow2_fail(dst, QCOW2_E_NOMEM, "out of memory");
    }
    *out = cv;
    return 0;
}

void qcow2_convert_free(qcow2_convert *cv)
{
    if (!cv)
        return;
    free(cv->buf);
    free(cv->zbuf);
    free(cv->jobs);
    free(cv->offsets);
    free(cv->ranges);
    free(cv);
}

void qcow2_convert_progress(const qcow2_convert *cv, uint64_t *done,
                            uint64_t *total)
{
    *total = cv->size;
    *done = cv->done ? cv->size : cv->pos;
}

const char *qcow2_convert_errmsg(const qcow2_convert *cv)
{
    return cv->err.msg;
}

/* ---- Writing one chunk ----------------------------------------------------- */

static int all_zero(const uint8_t *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* The L2 entry of a compressed stream (format doc 3.4). */
static uint64_t compressed_entry(const qcow2_image *img, uint64_t coffset,
                                 uint64_t length)
{
    uint64_t extra = (coffset + length - 1) / 512 - coffset / 512;
    return QCOW_OFLAG_COMPRESSED |
           (extra << (70 - img->cluster_bits)) | coffset;
}

/* Compressed streams jobs[first, last) for the clusters at guest
 * offsets[...], all under one L1 entry: each stream allocated and written,
 * then the entries in one L2 update (after a barrier, in commit). */
static int store_streams(qcow2_convert *cv, const uint64_t *offsets,
                         size_t first, size_t last)
{
    qcow2_image *img = cv->dst;
    qcow2_l2_work work;
    int rc = qcow2_begin_update(img);

    if (rc < 0)
        return rc;
    memset(&work, 0, sizeof work);
    rc = qcow2_l2_work_begin(img, qcow2_l1_index(img, offsets[first]),
                             &work);
    for (size_t i = first; i < last && rc == 0; i++) {
        uint64_t l2i = qcow2_l2_index(img, offsets[i]), coffset;
        qcow2_l2_desc old;

        rc = qcow2_l2_work_get(img, &work, l2i, &old);
        if (rc == 0 && (old.compressed || (old.entry & L2E_OFFSET_MASK)))
            rc = qcow2_fail(img, QCOW2_E_INVALID, "convert: cluster at "
                            "0x%" PRIx64 " is already allocated", offsets[i]);
        if (rc == 0)
            rc = qcow2_alloc_bytes(img, cv->jobs[i].len, &coffset);
        if (rc == 0)
            rc = qcow2_write_data(img, coffset, cv->jobs[i].dst,
                                  cv->jobs[i].len);
        if (rc == 0)
            qcow2_l2_work_set(img, &work, l2i,
                              compressed_entry(img, coffset,
                                               cv->jobs[i].len), 0);
    }
    if (rc == 0)
        rc = qcow2_l2_work_commit(img, &work);
    qcow2_l2_work_end(&work);
    return rc;
}

/* Non-zero units of the chunk at g (n bytes in cv->buf) compressed in
 * parallel, then written in order. */
static int write_compressed(qcow2_convert *cv, uint64_t g, uint64_t n)
{
    uint64_t cs = cv->unit, *offsets = cv->offsets;
    size_t count = 0, i = 0;
    int rc;

    for (uint64_t u = 0; u < n; u += cs) {
        size_t len = (size_t)min_u64(cs, n - u);
        qcow2_cjob *j = &cv->jobs[count];

        if (all_zero(cv->buf + u, len)) {
            if (cv->base) {
                rc = qcow2_write_zeroes(cv->dst, g + u, len, 0);
                if (rc < 0)
                    return rc;
            }
            continue;
        }
        /* The disk's last cluster is zero padded. */
        if (len < cs)
            memset(cv->buf + u + len, 0, (size_t)(cs - len));
        j->src = cv->buf + u;
        j->dst = cv->zbuf + u;
        j->cap = (size_t)cs - 1;   /* QEMU: a byte saved at least */
        offsets[count++] = g + u;
    }
    qcow2_compress_jobs(cv->dst->compression_type, (size_t)cs, cv->jobs,
                        count, cv->threads);
    while (i < count) {
        qcow2_cjob *j = &cv->jobs[i];
        size_t end = i + 1;

        if (j->rc < 0)
            return qcow2_fail(cv->dst, j->rc, "convert: compressing the "
                              "cluster at 0x%" PRIx64 " failed", offsets[i]);
        if (j->rc == QCOW2_DOES_NOT_SHRINK) {
            uint64_t len = min_u64(cs, cv->size - offsets[i]);
            rc = qcow2_write(cv->dst, offsets[i], j->src, (size_t)len);
        } else {
            /* The run of streams under one L2 table, in one update. */
            while (end < count && cv->jobs[end].rc == 0 &&
                   qcow2_l1_index(cv->dst, offsets[end]) ==
                   qcow2_l1_index(cv->dst, offsets[i]))
                end++;
            rc = store_streams(cv, offsets, i, end);
        }
        if (rc < 0)
            return rc;
        i = end;
    }
    return 0;
}

/* Non-zero units written in runs; zero units skipped, or written as
 * zeroes over a backing image. */
static int write_plain(qcow2_convert *cv, uint64_t g, uint64_t n)
{
    uint64_t u = 0;
    int rc;

    while (u < n) {
        uint64_t len = min_u64(cv->unit, n - u), end = u + len;
        int zero = all_zero(cv->buf + u, (size_t)len);

        /* Extend the run over units of the same kind. */
        while (end < n) {
            uint64_t l2 = min_u64(cv->unit, n - end);
            if (all_zero(cv->buf + end, (size_t)l2) != zero)
                break;
            end += l2;
        }
        if (!zero)
            rc = qcow2_write(cv->dst, g + u, cv->buf + u, (size_t)(end - u));
        else if (cv->base)
            rc = qcow2_write_zeroes(cv->dst, g + u, end - u, 0);
        else
            rc = 0;
        if (rc < 0)
            return rc;
        u = end;
    }
    return 0;
}

/* Guest [g, g + n) of the source (unit aligned, n <= chunk) into the
 * output. */
static int convert_range(qcow2_convert *cv, uint64_t g, uint64_t n)
{
    int rc = qcow2_read(cv->src, g, cv->buf, (size_t)n);

    if (rc < 0)
        return failed(cv, cv->src, rc);
    rc = cv->compress ? write_compressed(cv, g, n) : write_plain(cv, g, n);
    if (rc < 0)
        return failed(cv, cv->dst, rc);
    return 0;
}

/* ---- Finding the work ------------------------------------------------------ */

typedef struct next_data {
    int found;
    uint64_t start;
} next_data;

/* Stops at the first extent that holds bytes to copy (a corrupt one too:
 * its read then fails with the reason). */
static int find_data(void *ctx, const qcow2_extent *e)
{
    next_data *nd = ctx;

    if (e->type == QCOW2_EXTENT_ZERO || e->type == QCOW2_EXTENT_UNALLOCATED ||
        (e->type == QCOW2_EXTENT_DATA && e->reads_zero))
        return 0;
    nd->found = 1;
    nd->start = e->start;
    return 1;
}

static int step_sparse(qcow2_convert *cv)
{
    uint64_t window = min_u64(cv->size - cv->pos, CONVERT_MAP_WINDOW);
    next_data nd = { 0, 0 };
    uint64_t start, n;
    int rc = qcow2_map(cv->src, cv->pos, window, find_data, &nd);

    if (rc < 0)
        return failed(cv, cv->src, rc);
    if (!nd.found) {
        cv->pos += window;
        return 0;
    }
    start = nd.start - nd.start % cv->unit;
    if (start < cv->pos)
        start = cv->pos;
    n = min_u64(cv->chunk, cv->size - start);
    rc = convert_range(cv, start, n);
    if (rc == 0)
        cv->pos = start + n;
    return rc;
}

/* -B: the differing sectors, widened to units and merged. */
static int collect_range(void *ctx, uint64_t start, uint64_t length)
{
    qcow2_convert *cv = ctx;
    uint64_t s = start - start % cv->unit;
    uint64_t e = min_u64(align_up(start + length, cv->unit), cv->size);

    if (s >= cv->size)
        return 0;   /* past the source: the output is no larger */
    if (cv->n_ranges && cv->ranges[cv->n_ranges - 1][1] >= s) {
        if (e > cv->ranges[cv->n_ranges - 1][1])
            cv->ranges[cv->n_ranges - 1][1] = e;
        return 0;
    }
    if (cv->n_ranges == cv->cap_ranges) {
        size_t cap = cv->cap_ranges ? cv->cap_ranges * 2 : 64;
        void *grown = realloc(cv->ranges, cap * sizeof *cv->ranges);
        if (!grown) {
            cv->out_of_memory = 1;
            return QCOW2_E_NOMEM;
        }
        cv->ranges = grown;
        cv->cap_ranges = cap;
    }
    cv->ranges[cv->n_ranges][0] = s;
    cv->ranges[cv->n_ranges][1] = e;
    cv->n_ranges++;
    return 0;
}

static int step_differences(qcow2_convert *cv)
{
    uint64_t s, n;
    int rc;

    if (!cv->diffed) {
        rc = qcow2_diff(cv->src, cv->base, collect_range, cv, NULL);
        if (rc < 0 && cv->out_of_memory)
            return qcow2_error_set(&cv->err, QCOW2_E_NOMEM, "convert: out "
                                   "of memory for the differing ranges");
        if (rc < 0)
            return failed(cv, cv->src, rc);
        cv->diffed = 1;
        return 0;
    }
    if (cv->at_range == cv->n_ranges) {
        cv->pos = cv->size;
        return 0;
    }
    s = cv->ranges[cv->at_range][0];
    n = min_u64(cv->chunk, cv->ranges[cv->at_range][1] - s);
    rc = convert_range(cv, s, n);
    if (rc < 0)
        return rc;
    cv->pos = s + n;
    cv->ranges[cv->at_range][0] = s + n;
    if (s + n == cv->ranges[cv->at_range][1])
        cv->at_range++;
    return 0;
}

int qcow2_convert_step(qcow2_convert *cv)
{
    int rc;

    if (cv->done)
        return 0;
    if (cv->err.code)
        return cv->err.code;
    if (cv->pos < cv->size) {
        rc = cv->base ? step_differences(cv) : step_sparse(cv);
        return rc < 0 ? rc : 1;
    }
    rc = qcow2_flush(cv->dst);
    if (rc < 0)
        return failed(cv, cv->dst, rc);
    cv->done = 1;
    return 0;
}
