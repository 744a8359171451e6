/*
 * Bulk reads: a guest range handed out chunk by chunk, compressed
 * clusters inflated on a small pool of worker threads.
 *
 * Two chunk slots: while the caller consumes one (hashes it), the
 * calling thread has already filled the other (lookups, preads of
 * compressed streams, plain reads of everything else through
 * qcow2_read_salvage) and the workers inflate its clusters; the calling
 * thread inflates too while it waits for the chunk it needs. Workers see
 * only jobs (input bytes, an output place) and their own decoder: the
 * handle, its caches and its error buffer stay on the calling thread.
 * Damage and failures are replayed in guest order when a slot is handed
 * out, so a caller sees what qcow2_read_salvage would have shown.
 *
 * qcow2_bulk_read uses the same machinery for one range at a time, into
 * the caller's buffer (a third slot), for callers that skip around.
 *
 * Memory is per stream, reused for every chunk: no allocation per
 * cluster (the job array and input arena only grow to the largest chunk).
 */
#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "read_path.h"

/* Guest bytes per chunk: 8 clusters of 64 KiB (enough to keep the
 * workers busy while the caller hashes the chunk before; 1 MiB was no
 * faster and cost 1.8 MiB more peak RSS), at least two clusters, so that
 * big clusters are not inflated once per piece. */
#define BULK_CHUNK      ((size_t)1 << 19)
/* Chunks in flight (a ring; more were no faster), and one more slot for
 * qcow2_bulk_read's reads into the caller's buffer. */
#define BULK_SLOTS      2
#define BULK_DIRECT     BULK_SLOTS
#define BULK_MAX_THREADS 16

typedef struct bulk_job {
    size_t in_off, in_len;      /* the stream, in the slot's input arena */
    uint64_t coffset;           /* host offset of the stream (messages) */
    uint64_t guest, cluster_guest, length;
    uint8_t *dest;
    int rc;                     /* set by the worker */
} bulk_job;

typedef struct bulk_damage {
    uint64_t start, length, unit_start;
    char *reason;
} bulk_damage;

typedef struct bulk_slot {
    uint8_t *buf;
    uint64_t guest;
    size_t len;
    int active;                 /* filled, not yet handed out */
    bulk_job *jobs;
    size_t njobs, jobs_cap;
    size_t claimed, done;       /* under the pool's mutex */
    int published;              /* jobs visible to workers */
    unsigned long seq;          /* publication order */
    uint8_t *input;
    size_t input_len, input_cap;
    bulk_damage *damage;        /* from the plain pieces, in order */
    size_t ndamage, damage_cap;
    int rc;                     /* the fill's own failure, after the jobs */
    qcow2_error err;
} bulk_slot;

struct qcow2_bulk {
    qcow2_image *img;
    uint64_t next, end;
    size_t chunk;               /* guest bytes per slot */
    qcow2_damage_fn fn;
    void *ctx;
    int parallel;               /* compressed runs become jobs */
    int started, cur, failed;
    bulk_slot slots[BULK_SLOTS + 1];
    pthread_t threads[BULK_MAX_THREADS];
    int nthreads, want_threads; /* started with the first job */
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    int stop;
    unsigned long seq;
    uint64_t cluster_size;
    int compression_type;
    qcow2_codec *codec;         /* the calling thread's decoder, on first use */
    uint8_t *scratch;
};

/* ---- Jobs ---------------------------------------------------------------- */

/* Inflate one job with decoder codec; scratch is a cluster for jobs that
 * want only part of their cluster. */
static void run_job(const struct qcow2_bulk *b, const bulk_slot *s,
                    bulk_job *j, qcow2_codec *codec, uint8_t *scratch)
{
    int whole = j->guest == j->cluster_guest && j->length == b->cluster_size;
    uint8_t *out = whole ? j->dest : scratch;

    if (!codec || !scratch) {
        j->rc = QCOW2_E_NOMEM;
    } else {
        j->rc = qcow2_decoder_run(codec, b->compression_type,
                                  s->input + j->in_off, j->in_len, out);
        if (j->rc == 0 && !whole)
            memcpy(j->dest, scratch + (j->guest - j->cluster_guest),
                   (size_t)j->length);
    }
    if (j->rc != 0)
        memset(j->dest, 0, (size_t)j->length);
}

/* The oldest published slot with a job nobody took; under the mutex. */
static bulk_slot *claimable(struct qcow2_bulk *b)
{
    bulk_slot *best = NULL;

    for (int i = 0; i <= BULK_SLOTS; i++) {
        bulk_slot *s = &b->slots[i];
        if (s->published && s->claimed < s->njobs &&
            (!best || s->seq < best->seq))
            best = s;
    }
    return best;
}

static void *worker(void *arg)
{
    struct qcow2_bulk *b = arg;
    qcow2_codec *codec = qcow2_decoder_new(b->cluster_size);
    uint8_t *scratch = malloc((size_t)b->cluster_size);

    pthread_mutex_lock(&b->mu);
    while (!b->stop) {
        bulk_slot *s = claimable(b);
        bulk_job *j;

        if (!s) {
            pthread_cond_wait(&b->work, &b->mu);
            continue;
        }
        j = &s->jobs[s->claimed++];
        pthread_mutex_unlock(&b->mu);
        run_job(b, s, j, codec, scratch);
        pthread_mutex_lock(&b->mu);
        if (++s->done == s->njobs)
            pthread_cond_broadcast(&b->done);
    }
    pthread_mutex_unlock(&b->mu);
    qcow2_codec_free(codec);
    free(scratch);
    return NULL;
}

/* ---- Filling a slot (calling thread) ----------------------------------------- */

static int grow(void **array, size_t *cap, size_t need, size_t elem)
{
    size_t n = *cap ? *cap : 16;
    void *grown;

    if (need <= *cap)
        return 0;
    while (n < need) {
        if (n > SIZE_MAX / 2 / elem)
            return -1;
        n *= 2;
    }
    grown = realloc(*array, n * elem);
    if (!grown)
        return -1;
    *array = grown;
    *cap = n;
    return 0;
}

/* The plain pieces' damage, kept for the replay in guest order. */
static int keep_damage(void *ctx, uint64_t start, uint64_t length,
                       uint64_t unit_start, const char *reason)
{
    bulk_slot *s = ctx;
    void *array = s->damage;
    char *copy;

    if (grow(&array, &s->damage_cap, s->ndamage + 1, sizeof *s->damage))
        return 1;
    s->damage = array;
    copy = strdup(reason);
    if (!copy)
        return 1;
    s->damage[s->ndamage++] = (bulk_damage){ start, length, unit_start,
                                             copy };
    return 0;
}

static int read_plain(struct qcow2_bulk *b, bulk_slot *s, uint64_t from,
                      uint64_t to)
{
    if (to <= from)
        return 0;
    return qcow2_read_salvage(b->img, from, s->buf + (from - s->guest),
                              (size_t)(to - from),
                              b->fn ? keep_damage : NULL, s);
}

/* A compressed run becomes a job: its stream read now, inflated later.
 * A stream size out of bounds stays a plain piece (qcow2_read_salvage
 * reports it as it always does): returns 1 then. */
static int add_job(struct qcow2_bulk *b, bulk_slot *s, const qcow2_run *run)
{
    void *array;
    bulk_job *j;
    int rc;

    if (run->compressed_size == 0 ||
        run->compressed_size > 2 * b->cluster_size)
        return 1;
    array = s->jobs;
    if (grow(&array, &s->jobs_cap, s->njobs + 1, sizeof *s->jobs))
        return qcow2_fail(b->img, QCOW2_E_NOMEM, "out of memory (bulk read)");
    s->jobs = array;
    array = s->input;
    if (grow(&array, &s->input_cap,
             s->input_len + (size_t)run->compressed_size, 1))
        return qcow2_fail(b->img, QCOW2_E_NOMEM, "out of memory (bulk read)");
    s->input = array;
    rc = qcow2_read_host_data(b->img, run->host_offset,
                              s->input + s->input_len,
                              (size_t)run->compressed_size);
    if (rc < 0)
        return rc;
    j = &s->jobs[s->njobs++];
    *j = (bulk_job){
        .in_off = s->input_len, .in_len = (size_t)run->compressed_size,
        .coffset = run->host_offset, .guest = run->guest_offset,
        .cluster_guest = run->cluster_offset, .length = run->length,
        .dest = s->buf + (run->guest_offset - s->guest),
    };
    s->input_len += (size_t)run->compressed_size;
    return 0;
}

/* Walk the slot's range: compressed runs become jobs, everything between
 * is read at once. A failure stops the walk; the jobs before it still
 * run, and are replayed first (they come first in guest order). */
static int walk(struct qcow2_bulk *b, bulk_slot *s)
{
    uint64_t guest = s->guest, end = s->guest + s->len, plain = guest;
    int rc;

    if (!b->parallel)
        return read_plain(b, s, guest, end);
    while (guest < end) {
        qcow2_run run;

        rc = qcow2_lookup_span(b->img, guest, end - guest, &run);
        if (rc < 0)
            break;
        if (run.type == SC_COMPRESSED) {
            rc = read_plain(b, s, plain, guest);
            if (rc != 0)
                return rc;
            rc = add_job(b, s, &run);
            if (rc < 0)
                return rc;
            if (rc == 0)
                plain = guest + run.length;
        }
        guest += run.length;
    }
    /* A lookup failure: the plain read before it fails the same way, or
     * reaches it and fails there with qcow2_read's own message. */
    return read_plain(b, s, plain, end);
}

/* The workers start with the first compressed cluster: a stream over
 * plain clusters never has any. A thread that cannot start leaves fewer
 * (or none: the calling thread inflates everything). */
static void start_workers(struct qcow2_bulk *b)
{
    for (int i = 0; i < b->want_threads; i++) {
        if (pthread_create(&b->threads[b->nthreads], NULL, worker, b) != 0)
            break;
        b->nthreads++;
    }
    b->want_threads = 0;
}

/* Slot s (guest, len and buf set) walked and its jobs published. */
static void publish(struct qcow2_bulk *b, bulk_slot *s)
{
    s->njobs = s->claimed = s->done = 0;
    s->input_len = 0;
    s->rc = walk(b, s);
    if (s->rc != 0)
        s->err = b->img->err;
    if (s->njobs > 0 && b->want_threads > 0)
        start_workers(b);
    pthread_mutex_lock(&b->mu);
    s->published = 1;
    s->seq = ++b->seq;
    pthread_cond_broadcast(&b->work);
    pthread_mutex_unlock(&b->mu);
}

static void fill(struct qcow2_bulk *b, bulk_slot *s)
{
    s->guest = b->next;
    s->len = (size_t)min_u64(b->end - b->next, b->chunk);
    b->next += s->len;
    s->active = 1;
    publish(b, s);
}

/* ---- Handing a slot out ------------------------------------------------------- */

static void wait_jobs(struct qcow2_bulk *b, bulk_slot *s)
{
    pthread_mutex_lock(&b->mu);
    /* The calling thread inflates what no worker has taken yet: with no
     * workers that is everything, with workers it keeps both cores busy
     * while the chunk it needs next is still being inflated. */
    while (s->claimed < s->njobs) {
        bulk_job *j = &s->jobs[s->claimed++];
        pthread_mutex_unlock(&b->mu);
        if (!b->codec && !b->scratch) {
            b->codec = qcow2_decoder_new(b->cluster_size);
            b->scratch = malloc((size_t)b->cluster_size);
        }
        run_job(b, s, j, b->codec, b->scratch);
        pthread_mutex_lock(&b->mu);
        s->done++;
    }
    while (s->done < s->njobs)
        pthread_cond_wait(&b->done, &b->mu);
    s->published = 0;
    pthread_mutex_unlock(&b->mu);
}

static int job_failed(struct qcow2_bulk *b, const bulk_job *j)
{
    if (j->rc == QCOW2_E_NOMEM)
        return qcow2_fail(b->img, QCOW2_E_NOMEM,
                          "out of memory (decompressor)");
    /* compress.c's message for the same cluster */
    return qcow2_fail(b->img, QCOW2_E_CORRUPT,
                      "compressed cluster at host 0x%" PRIx64
                      " (guest 0x%" PRIx64 ") does not decompress",
                      j->coffset, j->guest);
}

/* Damage of the plain pieces and failed jobs, merged in guest order,
 * then the fill's own failure. */
static int replay(struct qcow2_bulk *b, bulk_slot *s)
{
    size_t i = 0, k = 0;
    int rc = 0;

    while (rc == 0 && (i < s->ndamage || k < s->njobs)) {
        if (k < s->njobs &&
            (i == s->ndamage || s->jobs[k].guest < s->damage[i].start)) {
            const bulk_job *j = &s->jobs[k++];
            if (j->rc == 0)
                continue;
            rc = job_failed(b, j);
            if (rc == QCOW2_E_CORRUPT && b->fn)
                rc = b->fn(b->ctx, j->guest, j->length, j->cluster_guest,
                           qcow2_errmsg(b->img));
        } else {
            const bulk_damage *d = &s->damage[i++];
            rc = b->fn(b->ctx, d->start, d->length, d->unit_start,
                       d->reason);
        }
    }
    for (i = 0; i < s->ndamage; i++)
        free(s->damage[i].reason);
    s->ndamage = 0;
    if (rc == 0 && s->rc != 0) {
        b->img->err = s->err;
        rc = s->rc;
    }
    return rc;
}

int qcow2_bulk_next(qcow2_bulk *b, const void **data, size_t *len)
{
    bulk_slot *s;
    int rc;

    *data = NULL;
    *len = 0;
    if (b->failed)
        return b->failed;
    if (!b->started) {
        b->started = 1;
        for (int i = 0; i + 1 < BULK_SLOTS && b->next < b->end; i++)
            fill(b, &b->slots[i]);
    }
    s = &b->slots[b->cur];
    if (!s->active)
        return 0;
    /* the slot handed out last is free again: the next chunk goes to the
     * workers before this one is waited for */
    if (b->next < b->end)
        fill(b, &b->slots[(b->cur + BULK_SLOTS - 1) % BULK_SLOTS]);
    wait_jobs(b, s);
    s->active = 0;
    rc = replay(b, s);
    if (rc != 0) {
        b->failed = rc;
        return rc;
    }
    *data = s->buf;
    *len = s->len;
    b->cur = (b->cur + 1) % BULK_SLOTS;
    return 0;
}

int qcow2_bulk_read(qcow2_bulk *b, uint64_t offset, void *buf, size_t len)
{
    bulk_slot *s = &b->slots[BULK_DIRECT];
    int rc;

    if (!range_inside(offset, len, b->img->size))
        return qcow2_fail(b->img, QCOW2_E_INVALID,
                          "read of %zu bytes at 0x%" PRIx64
                          " is outside the disk (size 0x%" PRIx64 ")",
                          len, offset, b->img->size);
    /* In pieces of a chunk that end on cluster boundaries: the compressed
     * streams of one piece are held at a time (a 2 MiB read held 1.5 MiB
     * of them), and no cluster is inflated once per piece. */
    for (size_t done = 0; done < len; done += s->len) {
        uint64_t g = offset + done;
        uint64_t e = g + max_u64(BULK_CHUNK, 2 * b->cluster_size);

        e -= e % b->cluster_size;
        s->guest = g;
        s->len = (size_t)(min_u64(e, offset + len) - g);
        s->buf = (uint8_t *)buf + done;
        publish(b, s);
        wait_jobs(b, s);
        rc = replay(b, s);
        s->buf = NULL;          /* the caller's */
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* ---- Life ------------------------------------------------------------------- */

static int online_cpus(void)
{
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > BULK_MAX_THREADS ? BULK_MAX_THREADS : (int)n;
}

int qcow2_bulk_open(qcow2_image *img, uint64_t offset, uint64_t length,
                    int threads, qcow2_damage_fn fn, void *ctx,
                    qcow2_bulk **out)
{
    struct qcow2_bulk *b;
    size_t chunk = (size_t)min_u64(length, max_u64(BULK_CHUNK,
                                                   2 * img->cluster_size));

    *out = NULL;
    if (!range_inside(offset, length, img->size))
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "read of %" PRIu64 " bytes at 0x%" PRIx64
                          " is outside the disk (size 0x%" PRIx64 ")",
                          length, offset, img->size);
    b = calloc(1, sizeof *b);
    if (!b)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (bulk read)");
    b->img = img;
    b->next = offset;
    b->end = offset + length;
    b->chunk = chunk;
    b->fn = fn;
    b->ctx = ctx;
    b->cluster_size = img->cluster_size;
    b->compression_type = img->compression_type;
    /* Raw and encrypted images read as they always do (one at a time). */
    b->parallel = !img->is_raw && img->hdr.crypt_method == CRYPT_NONE;
    for (int i = 0; i < BULK_SLOTS; i++) {
        b->slots[i].buf = malloc(chunk ? chunk : 1);
        if (!b->slots[i].buf) {
            while (i-- > 0)
                free(b->slots[i].buf);
            free(b);
            return qcow2_fail(img, QCOW2_E_NOMEM,
                              "out of memory (bulk read)");
        }
    }
    pthread_mutex_init(&b->mu, NULL);
    pthread_cond_init(&b->work, NULL);
    pthread_cond_init(&b->done, NULL);
    /* one worker per CPU besides the calling thread, which hashes (or
     * copies) each chunk and inflates while it waits for the next */
    if (threads == 0)
        threads = online_cpus() - 1;
    if (threads > BULK_MAX_THREADS)
        threads = BULK_MAX_THREADS;
    /* no compressed clusters to hand out: no workers either */
    b->want_threads = b->parallel && threads > 0 ? threads : 0;
    *out = b;
    return 0;
}

void qcow2_bulk_close(qcow2_bulk *b)
{
    if (!b)
        return;
    pthread_mutex_lock(&b->mu);
    b->stop = 1;
    pthread_cond_broadcast(&b->work);
    pthread_mutex_unlock(&b->mu);
    for (int i = 0; i < b->nthreads; i++)
        pthread_join(b->threads[i], NULL);
    pthread_mutex_destroy(&b->mu);
    pthread_cond_destroy(&b->work);
    pthread_cond_destroy(&b->done);
    qcow2_codec_free(b->codec);
    free(b->scratch);
    for (int i = 0; i <= BULK_SLOTS; i++) {
        bulk_slot *s = &b->slots[i];
        for (size_t k = 0; k < s->ndamage; k++)
            free(s->damage[k].reason);
        free(s->damage);
        free(s->jobs);
        free(s->input);
        free(s->buf);
    }
    free(b);
}
