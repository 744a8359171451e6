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
 * Compressed output: a chunk's non-zero clusters are queued to the
 * compression pool (convert_pool.c) and written here in guest order one
 * step later, one L2 update per table touched, while the pool works on
 * the next chunk; a cluster that does not shrink is written plainly, as
 * QEMU does. Plain output is written by a writer thread while the next
 * chunk is read. So a step reads chunk k + 1 and finishes chunk k, with
 * two chunk buffers in turn; the last step finishes the last chunk.
 *
 * Durability: with opts->unsafe (what img:convert asks for unless told
 * otherwise, as qemu-img convert's default cache mode is "unsafe") the
 * output is never synced; a crash leaves an output to be made again, as
 * an interrupted convert does.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "convert.h"

/* Bytes per step: the two chunk buffers stay in a core's cache between
 * the read and the write (8 MiB ones made every copy a memory round
 * trip). */
#define CONVERT_CHUNK       ((uint64_t)2 << 20)
/* Compressed output holds each chunk twice (its bytes and its streams):
 * 1 MiB chunks keep the peak RSS under qemu-img's, at the same speed. */
#define CONVERT_ZCHUNK      ((uint64_t)1 << 20)
#define CONVERT_HUGE_PAGE   ((size_t)2 << 20)
#define CONVERT_RAW_UNIT    4096u                   /* raw: hole grain */
#define CONVERT_MAP_WINDOW  ((uint64_t)16 << 30)    /* map looked at per step */

/* One chunk in flight: read, then written (one step later). */
typedef struct slot {
    qcow2_convert *cv;
    uint8_t *buf;               /* chunk bytes */
    uint8_t *zbuf;              /* compressed streams, one cluster each */
    qcow2_cjob *jobs;
    uint64_t *offsets;          /* guest offset of each job's cluster */
    size_t count;               /* jobs queued */
    uint64_t start, n;          /* the chunk's guest range */
    int pending;                /* read, not all written yet */
} slot;

struct qcow2_convert {
    qcow2_image *src, *dst, *base;
    int compress, threads;
    uint64_t size;              /* guest bytes to convert (the source's) */
    uint64_t pos;               /* everything before is read */
    uint64_t unit;              /* zero-detection and write grain */
    uint64_t chunk;             /* bytes per step (a multiple of unit) */
    slot slots[2];
    int cur;                    /* the slot the next chunk goes to */
    qcow2_bulk *reader;         /* the source's reads (parallel inflate) */
    qcow2_cpool *pool;          /* compressed output */
    qcow2_writer *writer;       /* plain output */
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

/* A chunk buffer in huge pages where the kernel offers them (fewer TLB
 * misses in the kernel's copies in and out of it). */
static uint8_t *chunk_alloc(uint64_t size)
{
    void *p = NULL;

    if (posix_memalign(&p, CONVERT_HUGE_PAGE, (size_t)size) != 0)
        return NULL;
    (void)madvise(p, (size_t)size, MADV_HUGEPAGE);
    return p;
}

/* The buffers of one slot; 0, or -1 when out of memory. */
static int slot_init(qcow2_convert *cv, slot *s)
{
    size_t clusters = (size_t)(cv->chunk / cv->unit);

    s->cv = cv;
    s->buf = chunk_alloc(cv->chunk);
    if (!s->buf)
        return -1;
    if (!cv->compress)
        return 0;
    s->zbuf = malloc(cv->chunk);
    s->jobs = calloc(clusters, sizeof *s->jobs);
    s->offsets = calloc(clusters, sizeof *s->offsets);
    return s->zbuf && s->jobs && s->offsets ? 0 : -1;
}

static int convert_begin_work(qcow2_image *src, qcow2_image *dst,
                              const qcow2_convert_opts *opts, qcow2_convert **out)
{
    qcow2_convert *cv;
    int rc = 0;

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
    if (opts->unsafe && dst->ws)
        dst->ws->no_sync = 1;
    cv->base = opts->only_differences ? dst->backing : NULL;
    cv->compress = opts->compress;
    /* Default: a worker per core, and the caller, which compresses
     * while it waits for a result (between its reads and writes). */
    cv->threads = opts->threads > 0 ? opts->threads : online_cpus() + 1;
    cv->size = src->size;
    cv->unit = dst->is_raw ? CONVERT_RAW_UNIT : dst->cluster_size;
    cv->chunk = align_up(cv->compress ? CONVERT_ZCHUNK : CONVERT_CHUNK,
                         cv->unit);
    if (slot_init(cv, &cv->slots[0]) < 0 || slot_init(cv, &cv->slots[1]) < 0)
        rc = QCOW2_E_NOMEM;
    /* The source's compressed clusters are inflated by workers as well
     * (threads as for compression: the caller is one of them). */
    else if (qcow2_bulk_open(src, 0, 0, opts->threads == 1 ? -1 :
                             opts->threads > 1 ? opts->threads - 1 : 0,
                             NULL, NULL, &cv->reader) < 0)
        rc = QCOW2_E_NOMEM;
    /* At most two chunks' clusters are queued: the one being written
     * and the one just read. */
    else if (cv->compress)
        rc = qcow2_cpool_new(dst->compression_type, (size_t)cv->unit,
                             2 * (size_t)(cv->chunk / cv->unit), cv->threads,
                             &cv->pool);
    else
        rc = qcow2_writer_new(&cv->writer);
    if (rc < 0) {
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
    /* Threads first: they may still use the slots' buffers and dst. */
    qcow2_cpool_free(cv->pool);
    qcow2_writer_free(cv->writer);
    qcow2_bulk_close(cv->reader);
    for (int i = 0; i < 2; i++) {
        free(cv->slots[i].buf);
        free(cv->slots[i].zbuf);
        free(cv->slots[i].jobs);
        free(cv->slots[i].offsets);
    }
    free(cv->ranges);
    free(cv);
}

void qcow2_convert_progress(const qcow2_convert *cv, uint64_t *done,
                            uint64_t *total)
{
    uint64_t d = cv->pos;

    /* Done: everything before the oldest chunk not written yet. */
    for (int i = 0; i < 2; i++)
        if (cv->slots[i].pending && cv->slots[i].start < d)
            d = cv->slots[i].start;
    *total = cv->size;
    *done = cv->done ? cv->size : d;
}

const char *qcow2_convert_errmsg(const qcow2_convert *cv)
{
    return cv->err.msg;
}

/* ---- Writing one chunk ----------------------------------------------------- */


/* The L2 entry of a compressed stream (format doc 3.4). */
static uint64_t compressed_entry(const qcow2_image *img, uint64_t coffset,
                                 uint64_t length)
{
    uint64_t extra = (coffset + length - 1) / 512 - coffset / 512;
    return QCOW_OFLAG_COMPRESSED |
           (extra << (70 - img->cluster_bits)) | coffset;
}

/* Compressed streams jobs[first, last) of slot s, all under one L1 entry:
 * each stream allocated and written, then the entries in one L2 update
 * (after a barrier, in commit). */
static int store_streams(qcow2_convert *cv, const slot *s, size_t first,
                         size_t last)
{
    qcow2_image *img = cv->dst;
    qcow2_l2_work work;
    int rc = qcow2_begin_update(img);

    if (rc < 0)
        return rc;
    memset(&work, 0, sizeof work);
    rc = qcow2_l2_work_begin(img, qcow2_l1_index(img, s->offsets[first]),
                             &work);
    for (size_t i = first; i < last && rc == 0; i++) {
        uint64_t l2i = qcow2_l2_index(img, s->offsets[i]), coffset;
        qcow2_l2_desc old;

        rc = qcow2_l2_work_get(img, &work, l2i, &old);
        if (rc == 0 && (old.compressed || (old.entry & L2E_OFFSET_MASK)))
            rc = qcow2_fail(img, QCOW2_E_INVALID, "convert: cluster at "
                            "0x%" PRIx64 " is already allocated",
                            s->offsets[i]);
        if (rc == 0)
            rc = qcow2_alloc_bytes(img, s->jobs[i].len, &coffset);
        if (rc == 0)
            rc = qcow2_write_data(img, coffset, s->jobs[i].dst,
                                  s->jobs[i].len);
        if (rc == 0)
            qcow2_l2_work_set(img, &work, l2i,
                              compressed_entry(img, coffset,
                                               s->jobs[i].len), 0);
    }
    if (rc == 0)
        rc = qcow2_l2_work_commit(img, &work);
    qcow2_l2_work_end(&work);
    return rc;
}

/* Non-zero units of slot s queued to the pool (zero ones skipped, or
 * written as zeroes over a backing image). */
static int queue_compressed(qcow2_convert *cv, slot *s)
{
    uint64_t cs = cv->unit;
    int rc;

    s->count = 0;
    for (uint64_t u = 0; u < s->n; u += cs) {
        size_t len = (size_t)min_u64(cs, s->n - u);
        qcow2_cjob *j = &s->jobs[s->count];

        if (bytes_all_zero(s->buf + u, len)) {
            if (cv->base) {
                rc = qcow2_write_zeroes(cv->dst, s->start + u, len, 0);
                if (rc < 0)
                    return rc;
            }
            continue;
        }
        /* The disk's last cluster is zero padded. */
        if (len < cs)
            memset(s->buf + u + len, 0, (size_t)(cs - len));
        j->src = s->buf + u;
        j->dst = s->zbuf + u;
        j->cap = (size_t)cs - 1;   /* QEMU: a byte saved at least */
        s->offsets[s->count++] = s->start + u;
    }
    qcow2_cpool_submit(cv->pool, s->jobs, s->count);
    return 0;
}

/* Slot s's compressed clusters written in guest order, each as soon as
 * the pool has it. */
static int store_compressed(qcow2_convert *cv, slot *s)
{
    uint64_t cs = cv->unit;
    size_t i = 0;
    int rc;

    while (i < s->count) {
        qcow2_cjob *j = &s->jobs[i];
        size_t end = i + 1;

        qcow2_cpool_wait(cv->pool, j);
        if (j->rc < 0)
            return qcow2_fail(cv->dst, j->rc, "convert: compressing the "
                              "cluster at 0x%" PRIx64 " failed",
                              s->offsets[i]);
        if (j->rc == QCOW2_DOES_NOT_SHRINK) {
            uint64_t len = min_u64(cs, cv->size - s->offsets[i]);
            rc = qcow2_write(cv->dst, s->offsets[i], j->src, (size_t)len);
        } else {
            /* The run of streams under one L2 table, in one update. */
            while (end < s->count &&
                   qcow2_l1_index(cv->dst, s->offsets[end]) ==
                   qcow2_l1_index(cv->dst, s->offsets[i])) {
                qcow2_cpool_wait(cv->pool, &s->jobs[end]);
                if (s->jobs[end].rc != 0)
                    break;
                end++;
            }
            rc = store_streams(cv, s, i, end);
        }
        if (rc < 0)
            return rc;
        i = end;
    }
    s->pending = 0;
    return 0;
}

/* Non-zero units of slot s written in runs; zero units skipped, or
 * written as zeroes over a backing image. On the writer thread: it
 * touches dst only. */
static int write_plain(void *ctx)
{
    slot *s = ctx;
    qcow2_convert *cv = s->cv;
    uint64_t u = 0, n = s->n;
    int rc;

    while (u < n) {
        uint64_t len = min_u64(cv->unit, n - u), end = u + len;
        int zero = bytes_all_zero(s->buf + u, (size_t)len);

        /* Extend the run over units of the same kind. */
        while (end < n) {
            uint64_t l2 = min_u64(cv->unit, n - end);
            if (bytes_all_zero(s->buf + end, (size_t)l2) != zero)
                break;
            end += l2;
        }
        if (!zero)
            rc = qcow2_write(cv->dst, s->start + u, s->buf + u,
                             (size_t)(end - u));
        else if (cv->base)
            rc = qcow2_write_zeroes(cv->dst, s->start + u, end - u, 0);
        else
            rc = 0;
        if (rc < 0)
            return rc;
        u = end;
    }
    return 0;
}

/* Guest [g, g + n) of the source (unit aligned, n <= chunk) read into the
 * next slot and started on its way out; the chunk before it finished. */
static int convert_range(qcow2_convert *cv, uint64_t g, uint64_t n)
{
    slot *s = &cv->slots[cv->cur], *prev = &cv->slots[cv->cur ^ 1];
    int rc = qcow2_bulk_read(cv->reader, g, s->buf, (size_t)n);

    if (rc < 0)
        return failed(cv, cv->src, rc);
    s->start = g;
    s->n = n;
    if (cv->compress) {
        rc = queue_compressed(cv, s);
        s->pending = rc == 0;
        if (rc == 0 && prev->pending)
            rc = store_compressed(cv, prev);
    } else {
        /* Waits for the previous chunk's writes first. */
        rc = qcow2_writer_run(cv->writer, write_plain, s);
        prev->pending = 0;
        s->pending = rc == 0;
    }
    if (rc < 0)
        return failed(cv, cv->dst, rc);
    cv->cur ^= 1;
    return 0;
}

/* The chunk still on its way out, finished (the last step). */
static int finish_pending(qcow2_convert *cv)
{
    int rc = 0;

    for (int i = 0; i < 2 && rc == 0; i++) {
        slot *s = &cv->slots[cv->cur ^ 1 ^ i];

        if (!s->pending)
            continue;
        if (cv->compress) {
            rc = store_compressed(cv, s);
        } else {
            rc = qcow2_writer_wait(cv->writer);
            s->pending = 0;
        }
    }
    return rc < 0 ? failed(cv, cv->dst, rc) : 0;
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
    rc = finish_pending(cv);
    if (rc < 0)
        return rc;
    rc = qcow2_flush(cv->dst);
    if (rc < 0)
        return failed(cv, cv->dst, rc);
    cv->done = 1;
    return 0;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_convert_begin(qcow2_image *src, qcow2_image *dst,
                        const qcow2_convert_opts *opts, qcow2_convert **out)
{
    int rc = qcow2_meta_flush(src);

    return rc < 0 ? rc : convert_begin_work(src, dst, opts, out);
}
