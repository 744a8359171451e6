/*
 * The read path (layer 5) besides the lookups of cluster.h: compressed
 * clusters, refcount reads, and a handle's teardown.
 */
#ifndef QCOW2_READ_PATH_H
#define QCOW2_READ_PATH_H

#include "cluster.h"

/* ---- Compressed clusters (compress.c) ------------------------------------ */
void qcow2_codec_free(qcow2_codec *codec);

/* Decompress the compressed cluster whose stream starts at host byte
 * coffset with csize bytes at most (the L2 entry's upper bound; the file
 * may end sooner). *cluster gets cluster_size bytes owned by img->codec,
 * valid until the next codec call. The last cluster decompressed is kept,
 * so reading it again costs nothing. guest_offset is for messages. */
int qcow2_decompress_cluster(qcow2_image *img, uint64_t coffset,
                             uint64_t csize, uint64_t guest_offset,
                             const uint8_t **cluster);
/* Drop the kept decompressed cluster (a writer reused its host bytes). */
void qcow2_codec_forget(qcow2_codec *codec);

/* A decoder owned by its caller, touching no image: for worker threads
 * (bulk_read.c). qcow2_decoder_run inflates one compressed stream of
 * in_len bytes into cluster_size bytes at out: 0, QCOW2_E_CORRUPT (does
 * not decompress) or QCOW2_E_NOMEM; it sets no error message. Freed with
 * qcow2_codec_free. */
qcow2_codec *qcow2_decoder_new(uint64_t cluster_size);
int qcow2_decoder_run(qcow2_codec *codec, int compression_type,
                      const uint8_t *in, size_t in_len, uint8_t *out);

/* qcow2_compress_cluster's "keep it uncompressed" answer (not an error). */
#define QCOW2_DOES_NOT_SHRINK 1
/* Compress one cluster (cluster_size bytes at src) with the image's
 * compression type, as QEMU writes it: deflate raw (level default,
 * windowBits -12, memLevel 9) or zstd level 3, one frame. At most
 * min(dst_cap, cluster_size - 1) bytes go to dst; *dst_len gets the
 * stream length. Returns 0, QCOW2_DOES_NOT_SHRINK when the stream does
 * not fit, or a negative status. */
int qcow2_compress_cluster(qcow2_image *img, const void *src, void *dst,
                           size_t dst_cap, size_t *dst_len);

/* ---- Refcounts (refcount.c) ------------------------------------------ */
int qcow2_reftable_load(qcow2_image *img);
/* Clusters [0, end_cluster) whose refcount is not zero, reading each
 * refcount block once. */
int qcow2_count_used_clusters(qcow2_image *img, uint64_t end_cluster,
                              uint64_t *out);

/* ---- Teardown (handle.c) ------------------------------------------------- */
/* Free img's caches, tables, names and the files it owns; no flush, no
 * backing image closed (qcow2_close does those first). NULL: nothing. */
void qcow2_handle_free(qcow2_image *img);

#endif /* QCOW2_READ_PATH_H */
