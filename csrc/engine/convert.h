/*
 * Layer 8: convert's parts shared between its files (convert.c drives,
 * convert_pool.c compresses clusters on worker threads).
 */
#ifndef QCOW2_CONVERT_H
#define QCOW2_CONVERT_H

#include "ops.h"

/* One cluster to compress: src holds cluster_size bytes, dst cap bytes.
 * After the run: rc 0 with len set, QCOW2_DOES_NOT_SHRINK (kept as
 * is), or a negative status. */
typedef struct qcow2_cjob {
    const uint8_t *src;
    uint8_t *dst;
    size_t cap;
    size_t len;
    int rc;
} qcow2_cjob;

/*
 * Compress jobs[0, n) with `threads` threads (the caller's one among
 * them), each with its own codec: no state shared but the job index.
 * compression_type: COMPRESSION_ZLIB or COMPRESSION_ZSTD, with the
 * parameters of compress.c (QEMU's). Returns 0, or a negative status
 * when no thread could start a codec (jobs then carry their rc).
 */
int qcow2_compress_jobs(int compression_type, size_t cluster_size,
                        qcow2_cjob *jobs, size_t n, int threads);

#endif /* QCOW2_CONVERT_H */
