/*
 * Compressed clusters: deflate (compression_type 0) and zstd (1), read
 * and write side, as QEMU 7.2's qcow2-threads.c behaves (format doc 6).
 *
 * Decoder/encoder state and the scratch buffers live in img->codec,
 * created on first use: nothing is global, and a sequential reader of one
 * compressed cluster pays for one decompression, not one per call.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>

#include "read_path.h"

/* QEMU writes deflate with a 4 KiB window and no zlib header. */
#define DEFLATE_WINDOW_BITS     (-12)
#define DEFLATE_MEM_LEVEL       9
#define ZSTD_LEVEL              3

struct qcow2_codec {
    uint64_t cluster_size;
    uint8_t *cluster;           /* the last decompressed cluster */
    int kept;                   /* cluster holds (kept_coffset, kept_csize) */
    uint64_t kept_coffset, kept_csize;
    uint8_t *input;             /* compressed bytes read from the file */
    size_t input_cap;
    z_stream inflater;
    int inflater_ready;
    z_stream deflater;
    int deflater_ready;
    ZSTD_DCtx *zstd_in;
    ZSTD_CCtx *zstd_out;
};

void qcow2_codec_free(qcow2_codec *codec)
{
    if (!codec)
        return;
    if (codec->inflater_ready)
        inflateEnd(&codec->inflater);
    if (codec->deflater_ready)
        deflateEnd(&codec->deflater);
    ZSTD_freeDCtx(codec->zstd_in);
    ZSTD_freeCCtx(codec->zstd_out);
    free(codec->cluster);
    free(codec->input);
    free(codec);
}

void qcow2_codec_forget(qcow2_codec *codec)
{
    if (codec)
        codec->kept = 0;
}

static int codec_attach(qcow2_image *img, qcow2_codec **out)
{
    qcow2_codec *codec = img->codec;

    if (codec && codec->cluster_size == img->cluster_size) {
        *out = codec;
        return 0;
    }
    qcow2_codec_free(codec);
    img->codec = NULL;
    codec = calloc(1, sizeof *codec);
    if (codec)
        codec->cluster = malloc((size_t)img->cluster_size);
    if (!codec || !codec->cluster) {
        qcow2_codec_free(codec);
        return qcow2_fail(img, QCOW2_E_NOMEM,
                          "out of memory (compression buffers)");
    }
    codec->cluster_size = img->cluster_size;
    img->codec = codec;
    *out = codec;
    return 0;
}

static int input_reserve(qcow2_image *img, qcow2_codec *codec, size_t len)
{
    uint8_t *grown;

    if (len <= codec->input_cap)
        return 0;
    grown = realloc(codec->input, len);
    if (!grown)
        return qcow2_fail(img, QCOW2_E_NOMEM,
                          "out of memory (compressed cluster)");
    codec->input = grown;
    codec->input_cap = len;
    return 0;
}

/* ---- Decompression ------------------------------------------------------- */

/* One inflate into the whole cluster. Z_BUF_ERROR is success too: the L2
 * entry's length is only sector precise, so the stream may be cut short
 * or not terminated inside the bytes given (QEMU accepts it as well). */
static int inflate_cluster(qcow2_codec *codec, const uint8_t *in,
                           size_t in_len, uint8_t *out)
{
    z_stream *strm = &codec->inflater;
    int ret;

    if (!codec->inflater_ready) {
        memset(strm, 0, sizeof *strm);
        if (inflateInit2(strm, DEFLATE_WINDOW_BITS) != Z_OK)
            return QCOW2_E_NOMEM;
        codec->inflater_ready = 1;
    } else if (inflateReset(strm) != Z_OK) {
        return QCOW2_E_CORRUPT;
    }
    strm->next_in = (Bytef *)in;
    strm->avail_in = (uInt)in_len;
    strm->next_out = out;
    strm->avail_out = (uInt)codec->cluster_size;
    ret = inflate(strm, Z_FINISH);
    if ((ret == Z_STREAM_END || ret == Z_BUF_ERROR) && strm->avail_out == 0)
        return 0;
    return QCOW2_E_CORRUPT;
}

/* Stream until exactly one cluster came out; several concatenated frames
 * are fine, trailing bytes are ignored, an unfinished last frame is not
 * (QEMU's qcow2_zstd_decompress). */
static int zstd_cluster(qcow2_codec *codec, const uint8_t *in, size_t in_len,
                        uint8_t *out)
{
    ZSTD_inBuffer input = { in, in_len, 0 };
    ZSTD_outBuffer output = { out, (size_t)codec->cluster_size, 0 };
    size_t ret = 0;

    if (!codec->zstd_in) {
        codec->zstd_in = ZSTD_createDCtx();
        if (!codec->zstd_in)
            return QCOW2_E_NOMEM;
    } else {
        ZSTD_DCtx_reset(codec->zstd_in, ZSTD_reset_session_only);
    }
    while (output.pos < output.size) {
        size_t in_before = input.pos, out_before = output.pos;

        ret = ZSTD_decompressStream(codec->zstd_in, &output, &input);
        if (ZSTD_isError(ret))
            return QCOW2_E_CORRUPT;
        /* No progress means the input ran out mid-frame. */
        if (input.pos == in_before && output.pos == out_before)
            return QCOW2_E_CORRUPT;
    }
    return ret == 0 ? 0 : QCOW2_E_CORRUPT;
}

int qcow2_decompress_cluster(qcow2_image *img, uint64_t coffset,
                             uint64_t csize, uint64_t guest_offset,
                             const uint8_t **cluster)
{
    qcow2_codec *codec;
    int rc;

    *cluster = NULL;
    rc = codec_attach(img, &codec);
    if (rc < 0)
        return rc;
    if (codec->kept && codec->kept_coffset == coffset &&
        codec->kept_csize == csize) {
        *cluster = codec->cluster;
        return 0;
    }
    codec->kept = 0;
    /* csize <= 2 * cluster size by the L2 encoding; refuse more anyway. */
    if (csize == 0 || csize > 2 * img->cluster_size)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "compressed cluster at host 0x%" PRIx64
                          " (guest 0x%" PRIx64 ") has a bad size %" PRIu64,
                          coffset, guest_offset, csize);
    rc = input_reserve(img, codec, (size_t)csize);
    if (rc < 0)
        return rc;
    /* The stored size may run past EOF: those bytes read as zeroes. */
    rc = qcow2_read_host_data(img, coffset, codec->input, (size_t)csize);
    if (rc < 0)
        return rc;
    if (img->compression_type == COMPRESSION_ZSTD)
        rc = zstd_cluster(codec, codec->input, (size_t)csize,
                          codec->cluster);
    else
        rc = inflate_cluster(codec, codec->input, (size_t)csize,
                             codec->cluster);
    if (rc == QCOW2_E_NOMEM)
        return qcow2_fail(img, rc, "out of memory (decompressor)");
    if (rc < 0)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "compressed cluster at host 0x%" PRIx64
                          " (guest 0x%" PRIx64 ") does not decompress",
                          coffset, guest_offset);
    codec->kept = 1;
    codec->kept_coffset = coffset;
    codec->kept_csize = csize;
    *cluster = codec->cluster;
    return 0;
}

/* ---- Decoders of their own, for worker threads --------------------------- */

/* A codec attached to no image: the decoder state only (no kept cluster,
 * no input buffer), so that a thread other than the handle's may inflate
 * streams the handle's thread has read. */
qcow2_codec *qcow2_decoder_new(uint64_t cluster_size)
{
    qcow2_codec *codec = calloc(1, sizeof *codec);

    if (codec)
        codec->cluster_size = cluster_size;
    return codec;
}

int qcow2_decoder_run(qcow2_codec *codec, int compression_type,
                      const uint8_t *in, size_t in_len, uint8_t *out)
{
    if (compression_type == COMPRESSION_ZSTD)
        return zstd_cluster(codec, in, in_len, out);
    return inflate_cluster(codec, in, in_len, out);
}

/* ---- Compression --------------------------------------------------------- */

static int deflate_cluster(qcow2_codec *codec, const void *src, void *dst,
                           size_t cap, size_t *dst_len)
{
    z_stream *strm = &codec->deflater;
    int ret;

    if (!codec->deflater_ready) {
        memset(strm, 0, sizeof *strm);
        if (deflateInit2(strm, Z_DEFAULT_COMPRESSION, Z_DEFLATED,
                         DEFLATE_WINDOW_BITS, DEFLATE_MEM_LEVEL,
                         Z_DEFAULT_STRATEGY) != Z_OK)
            return QCOW2_E_NOMEM;
        codec->deflater_ready = 1;
    } else if (deflateReset(strm) != Z_OK) {
        return QCOW2_E_IO;
    }
    strm->next_in = (Bytef *)src;
    strm->avail_in = (uInt)codec->cluster_size;
    strm->next_out = dst;
    strm->avail_out = (uInt)cap;
    ret = deflate(strm, Z_FINISH);
    if (ret == Z_STREAM_END) {
        *dst_len = cap - strm->avail_out;
        return 0;
    }
    /* Z_OK / Z_BUF_ERROR: the output filled up before the end. */
    return ret == Z_OK || ret == Z_BUF_ERROR ? QCOW2_DOES_NOT_SHRINK
                                             : QCOW2_E_IO;
}

static int zstd_compress_cluster(qcow2_codec *codec, const void *src,
                                 void *dst, size_t cap, size_t *dst_len)
{
    ZSTD_inBuffer input = { src, (size_t)codec->cluster_size, 0 };
    ZSTD_outBuffer output = { dst, cap, 0 };
    size_t ret;

    if (!codec->zstd_out) {
        codec->zstd_out = ZSTD_createCCtx();
        if (!codec->zstd_out)
            return QCOW2_E_NOMEM;
        if (ZSTD_isError(ZSTD_CCtx_setParameter(codec->zstd_out,
                                                ZSTD_c_compressionLevel,
                                                ZSTD_LEVEL)))
            return QCOW2_E_IO;
    } else {
        ZSTD_CCtx_reset(codec->zstd_out, ZSTD_reset_session_only);
    }
    /* ZSTD_e_end until it reports 0 left to flush: one whole frame. */
    do {
        size_t out_before = output.pos, in_before = input.pos;

        ret = ZSTD_compressStream2(codec->zstd_out, &output, &input,
                                   ZSTD_e_end);
        if (ZSTD_isError(ret))
            return QCOW2_E_IO;
        if (ret > output.size - output.pos ||
            (ret && output.pos == out_before && input.pos == in_before))
            return QCOW2_DOES_NOT_SHRINK;
    } while (ret);
    *dst_len = output.pos;
    return 0;
}

int qcow2_compress_cluster(qcow2_image *img, const void *src, void *dst,
                           size_t dst_cap, size_t *dst_len)
{
    qcow2_codec *codec;
    size_t cap;
    int rc;

    *dst_len = 0;
    rc = codec_attach(img, &codec);
    if (rc < 0)
        return rc;
    /* QEMU keeps a cluster uncompressed unless it saves a byte at least. */
    cap = (size_t)min_u64(dst_cap, img->cluster_size - 1);
    if (img->compression_type == COMPRESSION_ZSTD)
        rc = zstd_compress_cluster(codec, src, dst, cap, dst_len);
    else
        rc = deflate_cluster(codec, src, dst, cap, dst_len);
    if (rc == QCOW2_E_NOMEM)
        return qcow2_fail(img, rc, "out of memory (compressor)");
    if (rc < 0)
        return qcow2_fail(img, rc, "compressing a cluster failed");
    return rc;
}
