/*
 * Layer 8: convert's parts shared between its files (convert.c drives,
 * convert_pool.c compresses clusters on worker threads).
 */
#ifndef QCOW2_CONVERT_H
#define QCOW2_CONVERT_H

#include "ops.h"

/* One cluster to compress: src holds cluster_size bytes, dst cap bytes.
 * Once done: rc 0 with len set, QCOW2_DOES_NOT_SHRINK (kept as is), or
 * a negative status. */
typedef struct qcow2_cjob {
    const uint8_t *src;
    uint8_t *dst;
    size_t cap;
    size_t len;
    int rc;
    int done;                   /* the pool's, under its lock */
} qcow2_cjob;

/*
 * A compression pool for one convert: threads - 1 workers (the caller
 * is the last: it compresses queued jobs while it waits), each with its
 * own codec, over a FIFO of `capacity` jobs. compression_type:
 * COMPRESSION_ZLIB or COMPRESSION_ZSTD, with compress.c's parameters
 * (QEMU's). Used by one caller thread. QCOW2_E_NOMEM, or 0.
 */
typedef struct qcow2_cpool qcow2_cpool;
int qcow2_cpool_new(int compression_type, size_t cluster_size,
                    size_t capacity, int threads, qcow2_cpool **out);
/* Queue jobs[0, n); the caller never has more than capacity queued. */
void qcow2_cpool_submit(qcow2_cpool *p, qcow2_cjob *jobs, size_t n);
/* Return once job j is done. */
void qcow2_cpool_wait(qcow2_cpool *p, qcow2_cjob *j);
/* Queued jobs dropped, running ones finished, threads joined, freed. */
void qcow2_cpool_free(qcow2_cpool *p);

/*
 * A writer thread: runs one task at a time, fn(ctx), while the caller
 * goes on. run waits for the task before (returning its failure, and
 * then not starting fn); wait returns the last task's status. Without a
 * thread (one could not start) run calls fn itself.
 */
typedef struct qcow2_writer qcow2_writer;
int qcow2_writer_new(qcow2_writer **out);
int qcow2_writer_run(qcow2_writer *w, int (*fn)(void *ctx), void *ctx);
int qcow2_writer_wait(qcow2_writer *w);
void qcow2_writer_free(qcow2_writer *w);

#endif /* QCOW2_CONVERT_H */
