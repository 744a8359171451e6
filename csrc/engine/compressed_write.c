/*
 * Compressed cluster writes (QEMU's qcow2_co_pwritev_compressed_task and
 * qcow2_alloc_compressed_cluster_offset): one whole cluster, compressed
 * with the image's codec, packed at byte granularity after the previous
 * stream, or written as a normal cluster when it does not shrink.
 */
#include <stdlib.h>
#include <string.h>

#include "write_path.h"

static int check_request(qcow2_image *img, uint64_t offset, size_t length)
{
    int rc = qcow2_check_writable(img);

    if (rc < 0)
        return rc;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "a raw image cannot "
                          "hold compressed clusters");
    if (qcow2_has_data_file(img))
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "compression is not "
                          "supported with an external data file");
    if (img->hdr.crypt_method != CRYPT_NONE)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "compression and "
                          "encryption are not supported at the same time");
    if (!is_aligned(offset, img->cluster_size) ||
        !range_inside(offset, length, img->size))
        return qcow2_fail(img, QCOW2_E_INVALID, "compressed write of %zu "
                          "bytes at 0x%llx: the offset must be cluster "
                          "aligned and inside the disk", length,
                          (unsigned long long)offset);
    /* One whole cluster; only the disk's last one may be shorter. */
    if (length != img->cluster_size &&
        !(length < img->cluster_size && offset + length == img->size))
        return qcow2_fail(img, QCOW2_E_INVALID, "compressed write of %zu "
                          "bytes at 0x%llx: a compressed write is one whole "
                          "cluster (%llu bytes)", length,
                          (unsigned long long)offset,
                          (unsigned long long)img->cluster_size);
    return 0;
}

/* Refuse an allocated target, as QEMU 7.2 does (it returns EIO). */
static int check_target(qcow2_image *img, const qcow2_l2_desc *old,
                        uint64_t offset)
{
    if (old->compressed || (old->entry & L2E_OFFSET_MASK))
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "compressed write at "
                          "0x%llx: the cluster is already allocated "
                          "(compressed writes need an unallocated cluster)",
                          (unsigned long long)offset);
    return 0;
}

/* L2 entry of a stream (format doc 3.4): byte offset, then the count of
 * 512-byte sectors after the first that the stream touches. */
static uint64_t compressed_entry(const qcow2_image *img, uint64_t coffset,
                                 uint64_t length)
{
    uint64_t extra = (coffset + length - 1) / 512 - coffset / 512;
    return QCOW_OFLAG_COMPRESSED |
           (extra << (70 - img->cluster_bits)) | coffset;
}

/* Stream allocated (refcounts), written, then the entry (after a barrier
 * in commit); the kept decompressed cluster may alias the new bytes. */
static int store_stream(qcow2_image *img, qcow2_l2_work *work,
                        uint64_t offset, const uint8_t *stream,
                        size_t length)
{
    uint64_t coffset;
    int rc = qcow2_alloc_bytes(img, length, &coffset);

    if (rc == 0)
        rc = qcow2_write_data(img, coffset, stream, length);
    if (img->codec)
        qcow2_codec_forget(img->codec);
    if (rc < 0)
        return rc;
    qcow2_l2_work_set(img, work, qcow2_l2_index(img, offset),
                      compressed_entry(img, coffset, length), 0);
    return qcow2_l2_work_commit(img, work);
}

static int write_compressed_call(qcow2_image *img, uint64_t offset,
                                 const void *buf, size_t length)
{
    uint64_t cs = img->cluster_size;
    uint8_t *cluster = NULL, *stream = NULL;
    size_t stream_length = 0;
    qcow2_l2_desc old;
    qcow2_l2_work work;
    int rc = check_request(img, offset, length);

    if (rc < 0)
        return rc;
    rc = qcow2_begin_update(img);
    if (rc < 0)
        return rc;
    memset(&work, 0, sizeof work);
    rc = qcow2_l2_work_begin(img, qcow2_l1_index(img, offset), &work);
    if (rc == 0)
        rc = qcow2_l2_work_get(img, &work, qcow2_l2_index(img, offset), &old);
    if (rc == 0)
        rc = check_target(img, &old, offset);
    if (rc == 0) {
        cluster = calloc(1, cs);
        stream = malloc(cs);
        if (!cluster || !stream)
            rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    if (rc == 0) {
        /* The disk's last cluster is zero padded. */
        memcpy(cluster, buf, length);
        rc = qcow2_compress_cluster(img, cluster, stream, cs - 1,
                                    &stream_length);
    }
    if (rc == QCOW2_DOES_NOT_SHRINK) {
        /* Kept uncompressed, as QEMU keeps it. */
        qcow2_l2_work_end(&work);
        rc = qcow2_write(img, offset, buf, length);
    } else if (rc == 0) {
        rc = store_stream(img, &work, offset, stream, stream_length);
        qcow2_l2_work_end(&work);
    } else {
        qcow2_l2_work_end(&work);
    }
    free(cluster);
    free(stream);
    return rc;
}

int qcow2_write_compressed(qcow2_image *img, uint64_t offset,
                           const void *buf, size_t length)
{
    int rc;

    qcow2_call_begin(img);
    rc = write_compressed_call(img, offset, buf, length);
    return qcow2_call_end(img, rc);
}
