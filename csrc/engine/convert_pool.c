/*
 * Convert's parallel compression (layer 8): clusters compressed on worker
 * threads, each with a codec of its own, taking jobs from one shared
 * index. Workers touch only their jobs' buffers: no image handle, no
 * global state. The caller writes the results in order afterwards.
 *
 * The streams are those compress.c makes (QEMU's parameters: raw deflate
 * with a 4 KiB window, or one zstd frame), kept only when they save a
 * byte at least.
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

typedef struct pool {
    int type;
    size_t cluster_size;
    qcow2_cjob *jobs;
    size_t n;
    size_t next;                /* next job index (atomic) */
} pool;

typedef struct worker_codec {
    z_stream z;
    int z_ready;
    ZSTD_CCtx *zstd;
} worker_codec;

static int deflate_one(worker_codec *c, const pool *p, qcow2_cjob *j)
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
    c->z.avail_in = (uInt)p->cluster_size;
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

static int zstd_one(worker_codec *c, const pool *p, qcow2_cjob *j)
{
    ZSTD_inBuffer in = { j->src, p->cluster_size, 0 };
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

static void *work(void *arg)
{
    pool *p = arg;
    worker_codec c;

    memset(&c, 0, sizeof c);
    for (;;) {
        size_t i = __atomic_fetch_add(&p->next, 1, __ATOMIC_RELAXED);
        qcow2_cjob *j;

        if (i >= p->n)
            break;
        j = &p->jobs[i];
        j->len = 0;
        j->rc = p->type == COMPRESSION_ZSTD ? zstd_one(&c, p, j)
                                            : deflate_one(&c, p, j);
    }
    if (c.z_ready)
        deflateEnd(&c.z);
    ZSTD_freeCCtx(c.zstd);
    return NULL;
}

int qcow2_compress_jobs(int compression_type, size_t cluster_size,
                        qcow2_cjob *jobs, size_t n, int threads)
{
    pthread_t tid[POOL_MAX_THREADS];
    pool p = { compression_type, cluster_size, jobs, n, 0 };
    int started = 0;

    if (threads > POOL_MAX_THREADS)
        threads = POOL_MAX_THREADS;
    if ((size_t)threads > n)
        threads = (int)n;
    /* A thread that cannot start only means fewer workers. */
    for (int i = 1; i < threads; i++) {
        if (pthread_create(&tid[started], NULL, work, &p) != 0)
            break;
        started++;
    }
    work(&p);
    for (int i = 0; i < started; i++)
        pthread_join(tid[i], NULL);
    return 0;
}
