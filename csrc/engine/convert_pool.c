/*
 * Convert's worker threads (layer 8), started once per convert:
 *
 * - a compression pool: clusters compressed on worker threads, each with
 *   a codec of its own, taken from a bounded FIFO. The caller queues a
 *   chunk's clusters and goes on (reading the next chunk, writing the
 *   previous one); when it needs a result it waits for that job,
 *   compressing queued jobs itself meanwhile. So the cores stay busy
 *   across chunk boundaries, with no thread started per chunk.
 * - a writer: one thread that runs one task at a time (a chunk's plain
 *   writes) while the caller reads the next chunk.
 *
 * Workers touch only their jobs' buffers (the writer only the output
 * handle, which the caller leaves alone until it has waited): no global
 * state. The streams are those compress.c makes (QEMU's parameters: raw
 * deflate with a 4 KiB window, or one zstd frame), kept only when they
 * save a byte at least.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>

#include "convert.h"

#define POOL_MAX_THREADS    64
#define DEFLATE_WINDOW_BITS (-12)
#define DEFLATE_MEM_LEVEL   9
#define ZSTD_LEVEL          3

typedef struct worker_codec {
    z_stream z;
    int z_ready;
    ZSTD_CCtx *zstd;
} worker_codec;

struct qcow2_cpool {
    int type;
    size_t cluster_size;
    pthread_mutex_t lock;
    pthread_cond_t work;        /* jobs queued, or stop */
    pthread_cond_t done;        /* a job finished */
    qcow2_cjob **queue;         /* ring of `cap` pointers */
    size_t cap, head, count;
    int stop;
    int n_threads;
    pthread_t tid[POOL_MAX_THREADS];
    worker_codec caller;        /* the waiting caller's codec */
};

/* ---- One cluster ------------------------------------------------------------- */

static int deflate_one(worker_codec *c, size_t cluster_size, qcow2_cjob *j)
{
    int ret;

    if (!c->z_ready) {
        memset(&c->z, 0, sizeof c->z);
        if (deflateInit2(&c->z, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
                         DEFLATE_WINDOW_BITS, DEFLATE_MEM_LEVEL,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            return QCOW2_E_NOMEM;
        c->z_ready = 1;
    } else if (deflateReset(&c->z) != Z_OK) {
        return QCOW2_E_IO;
    }
    c->z.next_in = (Bytef *)j->src;
    c->z.avail_in = (uInt)cluster_size;
    c->z.next_out = j->dst;
    c->z.avail_out = (uInt)j->cap;
    ret = deflate(&c->z, Z_FINISH);
    if (ret == Z_STREAM_END) {
        j->len = j->cap - c->z.avail_out;
        return 0;
    }
    return ret == Z_OK || ret == Z_BUF_ERROR ? QCOW2_DOES_NOT_SHRINK
                                             : QCOW2_E_IO;
}

static int zstd_one(worker_codec *c, size_t cluster_size, qcow2_cjob *j)
{
    ZSTD_inBuffer in = { j->src, cluster_size, 0 };
    ZSTD_outBuffer out = { j->dst, j->cap, 0 };
    size_t ret;

    if (!c->zstd) {
        c->zstd = ZSTD_createCCtx();
        if (!c->zstd)
            return QCOW2_E_NOMEM;
        if (ZSTD_isError(ZSTD_CCtx_setParameter(c->zstd,
                                                ZSTD_c_compressionLevel,
                                                ZSTD_LEVEL)))
            return QCOW2_E_IO;
    } else {
        ZSTD_CCtx_reset(c->zstd, ZSTD_reset_session_only);
    }
    do {
        size_t out_before = out.pos, in_before = in.pos;

        ret = ZSTD_compressStream2(c->zstd, &out, &in, ZSTD_e_end);
        if (ZSTD_isError(ret))
            return QCOW2_E_IO;
        if (ret > out.size - out.pos ||
            (ret && out.pos == out_before && in.pos == in_before))
            return QCOW2_DOES_NOT_SHRINK;
    } while (ret);
    j->len = out.pos;
    return 0;
}

static void compress_one(worker_codec *c, const qcow2_cpool *p,
                         qcow2_cjob *j)
{
    j->len = 0;
    j->rc = p->type == COMPRESSION_ZSTD ? zstd_one(c, p->cluster_size, j)
                                        : deflate_one(c, p->cluster_size, j);
}

static void codec_end(worker_codec *c)
{
    if (c->z_ready)
        deflateEnd(&c->z);
    c->z_ready = 0;
    ZSTD_freeCCtx(c->zstd);
    c->zstd = NULL;
}

/* ---- The pool ---------------------------------------------------------------- */

/* Under the lock: the oldest queued job, or NULL. */
static qcow2_cjob *pop(qcow2_cpool *p)
{
    qcow2_cjob *j;

    if (p->count == 0)
        return NULL;
    j = p->queue[p->head];
    p->head = (p->head + 1) % p->cap;
    p->count--;
    return j;
}

static void *worker(void *arg)
{
    qcow2_cpool *p = arg;
    worker_codec c;

    memset(&c, 0, sizeof c);
    pthread_mutex_lock(&p->lock);
    for (;;) {
        qcow2_cjob *j;

        while (!p->stop && p->count == 0)
            pthread_cond_wait(&p->work, &p->lock);
        if (p->stop)
            break;
        j = pop(p);
        pthread_mutex_unlock(&p->lock);
        compress_one(&c, p, j);
        pthread_mutex_lock(&p->lock);
        j->done = 1;
        pthread_cond_signal(&p->done);   /* the caller is the one waiter */
    }
    pthread_mutex_unlock(&p->lock);
    codec_end(&c);
    return NULL;
}

int qcow2_cpool_new(int compression_type, size_t cluster_size,
                    size_t capacity, int threads, qcow2_cpool **out)
{
    qcow2_cpool *p = calloc(1, sizeof *p);

    *out = NULL;
    if (!p)
        return QCOW2_E_NOMEM;
    p->queue = calloc(capacity ? capacity : 1, sizeof *p->queue);
    if (!p->queue) {
        free(p);
        return QCOW2_E_NOMEM;
    }
    p->type = compression_type;
    p->cluster_size = cluster_size;
    p->cap = capacity ? capacity : 1;
    if (pthread_mutex_init(&p->lock, NULL) != 0) {
        free(p->queue);
        free(p);
        return QCOW2_E_NOMEM;
    }
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->done, NULL);
    if (threads > POOL_MAX_THREADS)
        threads = POOL_MAX_THREADS;
    /* The caller is one of the threads (it compresses while it waits);
     * a worker that cannot start only means fewer workers. */
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&p->tid[p->n_threads], NULL, worker, p) != 0)
            break;
        p->n_threads++;
    }
    *out = p;
    return 0;
}

void qcow2_cpool_submit(qcow2_cpool *p, qcow2_cjob *jobs, size_t n)
{
    pthread_mutex_lock(&p->lock);
    for (size_t i = 0; i < n && p->count < p->cap; i++) {
        jobs[i].done = 0;
        p->queue[(p->head + p->count) % p->cap] = &jobs[i];
        p->count++;
    }
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
}

void qcow2_cpool_wait(qcow2_cpool *p, qcow2_cjob *j)
{
    pthread_mutex_lock(&p->lock);
    while (!j->done) {
        qcow2_cjob *mine = pop(p);

        if (!mine) {
            pthread_cond_wait(&p->done, &p->lock);
            continue;
        }
        pthread_mutex_unlock(&p->lock);
        compress_one(&p->caller, p, mine);
        pthread_mutex_lock(&p->lock);
        mine->done = 1;
    }
    pthread_mutex_unlock(&p->lock);
}

void qcow2_cpool_free(qcow2_cpool *p)
{
    if (!p)
        return;
    /* Queued jobs are dropped; running ones finish before the join, so
     * the caller may free their buffers afterwards. */
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    p->count = 0;
    pthread_cond_broadcast(&p->work);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->n_threads; i++)
        pthread_join(p->tid[i], NULL);
    codec_end(&p->caller);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->lock);
    free(p->queue);
    free(p);
}

/* ---- The writer ---------------------------------------------------------------- */

struct qcow2_writer {
    pthread_mutex_t lock;
    pthread_cond_t cv;
    pthread_t tid;
    int started, busy, stop, rc;
    int (*fn)(void *ctx);
    void *ctx;
};

static void *writer_main(void *arg)
{
    qcow2_writer *w = arg;

    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (!w->stop && !w->busy)
            pthread_cond_wait(&w->cv, &w->lock);
        if (!w->busy)
            break;              /* stopped with nothing to run */
        pthread_mutex_unlock(&w->lock);
        {
            int rc = w->fn(w->ctx);
            pthread_mutex_lock(&w->lock);
            w->rc = rc;
        }
        w->busy = 0;
        pthread_cond_broadcast(&w->cv);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

int qcow2_writer_new(qcow2_writer **out)
{
    qcow2_writer *w = calloc(1, sizeof *w);

    *out = NULL;
    if (!w)
        return QCOW2_E_NOMEM;
    if (pthread_mutex_init(&w->lock, NULL) != 0) {
        free(w);
        return QCOW2_E_NOMEM;
    }
    pthread_cond_init(&w->cv, NULL);
    /* Without the thread, tasks run in the caller (qcow2_writer_run). */
    w->started = pthread_create(&w->tid, NULL, writer_main, w) == 0;
    *out = w;
    return 0;
}

int qcow2_writer_wait(qcow2_writer *w)
{
    int rc;

    pthread_mutex_lock(&w->lock);
    while (w->busy)
        pthread_cond_wait(&w->cv, &w->lock);
    rc = w->rc;
    w->rc = 0;
    pthread_mutex_unlock(&w->lock);
    return rc;
}

int qcow2_writer_run(qcow2_writer *w, int (*fn)(void *ctx), void *ctx)
{
    int rc = qcow2_writer_wait(w);

    if (rc < 0)
        return rc;
    if (!w->started)
        return fn(ctx);
    pthread_mutex_lock(&w->lock);
    w->fn = fn;
    w->ctx = ctx;
    w->busy = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->lock);
    return 0;
}

void qcow2_writer_free(qcow2_writer *w)
{
    if (!w)
        return;
    qcow2_writer_wait(w);
    pthread_mutex_lock(&w->lock);
    w->stop = 1;
    pthread_cond_broadcast(&w->cv);
    pthread_mutex_unlock(&w->lock);
    if (w->started)
        pthread_join(w->tid, NULL);
    pthread_cond_destroy(&w->cv);
    pthread_mutex_destroy(&w->lock);
    free(w);
}
