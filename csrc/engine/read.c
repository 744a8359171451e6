/*
 * Guest reads: qcow2_read walks the runs of the range (cluster.c) and
 * moves each straight into the caller's buffer. Data runs whose host
 * offsets continue each other, across clusters and L2 tables, become one
 * pread; unallocated runs become one read of the backing image.
 *
 * A damaged run (metadata that cannot be followed, a compressed cluster
 * that does not decompress) fails the read, or with qcow2_read_salvage
 * reads as zeroes and is reported, at whatever level of the chain.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "read_path.h"

/* Work not yet done: a data run and a backing run, each coalesced until
 * the next run does not continue it. */
typedef struct read_state {
    qcow2_image *img;
    uint8_t *buf;               /* the caller's buffer */
    uint64_t start;             /* guest offset of buf[0] */
    uint64_t data_guest, data_host, data_len;
    uint64_t backing_guest, backing_len;
    qcow2_damage_fn damage_fn;  /* NULL: damage fails the read */
    void *damage_ctx;
} read_state;


static uint8_t *dest(const read_state *rs, uint64_t guest_offset)
{
    return rs->buf + (guest_offset - rs->start);
}

/* ---- Raw images ------------------------------------------------------------ */

static int read_raw(qcow2_image *img, uint64_t offset, uint8_t *buf,
                    size_t length)
{
    char text[128];
    size_t done;
    /* A raw image may be shorter than its virtual size: zeroes. */
    int rc = qcow2_pread_zero_fill(img->io, offset, buf, length, &done);

    if (rc < 0)
        return qcow2_fail(img, rc, "read of %zu bytes at 0x%" PRIx64
                          " failed: %s", length - done, offset + done,
                          qcow2_errno_text(img->io->last_errno, text,
                                           sizeof text));
    return 0;
}

/* ---- Pending work ------------------------------------------------------------ */

/* Bytes of an encrypted data run decrypted at a time. */
#define CRYPT_CHUNK     (1u << 20)

/* An encrypted run: whole sectors read (guest and host offsets share
 * their offset inside a cluster, so both align alike), decrypted in a
 * bounded buffer, the asked-for bytes copied out. */
static int read_encrypted(read_state *rs, uint64_t guest, uint64_t host,
                          uint64_t len)
{
    uint64_t end = guest + len;
    uint8_t *bounce = malloc(CRYPT_CHUNK);
    int rc = 0;

    if (!bounce)
        return qcow2_fail(rs->img, QCOW2_E_NOMEM, "out of memory");
    while (rc == 0 && guest < end) {
        uint64_t head = guest % QCOW2_CRYPTO_SECTOR;
        uint64_t a_guest = guest - head, a_host = host - head;
        uint64_t n = min_u64(CRYPT_CHUNK, align_up(end, QCOW2_CRYPTO_SECTOR)
                                          - a_guest);
        uint64_t take = min_u64(n - head, end - guest);

        rc = qcow2_read_host_data(rs->img, a_host, bounce, (size_t)n);
        if (rc == 0)
            rc = qcow2_crypt_data(rs->img, a_guest, a_host, bounce,
                                  (size_t)n, 0);
        if (rc == 0)
            memcpy(dest(rs, guest), bounce + head, (size_t)take);
        guest += take;
        host += take;
    }
    free(bounce);
    return rc;
}

static int flush_data(read_state *rs)
{
    int rc;

    if (rs->data_len == 0)
        return 0;
    if (rs->img->crypto) {
        uint64_t len = rs->data_len;

        rs->data_len = 0;
        return read_encrypted(rs, rs->data_guest, rs->data_host, len);
    }
    rc = qcow2_read_host_data(rs->img, rs->data_host,
                              dest(rs, rs->data_guest), (size_t)rs->data_len);
    rs->data_len = 0;
    return rc;
}

/* The image's own error buffer gets the backing image's message, which
 * already names the backing file. */
static int backing_failed(qcow2_image *img, int rc)
{
    img->err = img->backing->err;
    if (img->err.code == 0)
        img->err.code = rc;
    return rc;
}

static int flush_backing(read_state *rs)
{
    qcow2_image *img = rs->img;
    uint64_t guest = rs->backing_guest, len = rs->backing_len;
    uint64_t inside = 0;
    int rc;

    if (len == 0)
        return 0;
    rs->backing_len = 0;
    if (img->backing && guest < img->backing->size)
        inside = min_u64(len, img->backing->size - guest);
    if (inside) {
        rc = qcow2_read_salvage(img->backing, guest, dest(rs, guest),
                                (size_t)inside, rs->damage_fn,
                                rs->damage_ctx);
        if (rc < 0)
            return backing_failed(img, rc);
        if (rc > 0)
            return rc;          /* the damage callback stopped the read */
    }
    /* No backing file, or past its end: zeroes. */
    memset(dest(rs, guest + inside), 0, (size_t)(len - inside));
    return 0;
}

static int queue_data(read_state *rs, const qcow2_run *run)
{
    int rc;

    if (rs->data_len && rs->data_guest + rs->data_len == run->guest_offset &&
        rs->data_host + rs->data_len == run->host_offset) {
        rs->data_len += run->length;
        return 0;
    }
    rc = flush_data(rs);
    rs->data_guest = run->guest_offset;
    rs->data_host = run->host_offset;
    rs->data_len = run->length;
    return rc;
}

static int queue_backing(read_state *rs, const qcow2_run *run)
{
    int rc;

    if (rs->backing_len &&
        rs->backing_guest + rs->backing_len == run->guest_offset) {
        rs->backing_len += run->length;
        return 0;
    }
    rc = flush_backing(rs);
    rs->backing_guest = run->guest_offset;
    rs->backing_len = run->length;
    return rc;
}

/* ---- Runs ------------------------------------------------------------------- */

/* A damaged run: the read fails with the message the lookup left, or the
 * run reads as zeroes and is reported after the work queued before it. */
static int damaged(read_state *rs, uint64_t guest, uint64_t length,
                   uint64_t unit_start)
{
    int rc;

    if (!rs->damage_fn)
        return QCOW2_E_CORRUPT;
    if ((rc = flush_data(rs)) != 0 || (rc = flush_backing(rs)) != 0)
        return rc;
    memset(dest(rs, guest), 0, (size_t)length);
    return rs->damage_fn(rs->damage_ctx, guest, length, unit_start,
                         qcow2_errmsg(rs->img));
}

static int read_compressed(read_state *rs, const qcow2_run *run)
{
    const uint8_t *cluster;
    int rc;

    rc = qcow2_decompress_cluster(rs->img, run->host_offset,
                                  run->compressed_size, run->guest_offset,
                                  &cluster);
    if (rc == QCOW2_E_CORRUPT)
        return damaged(rs, run->guest_offset, run->length,
                       run->cluster_offset);
    if (rc < 0)
        return rc;
    memcpy(dest(rs, run->guest_offset),
           cluster + (run->guest_offset - run->cluster_offset),
           (size_t)run->length);
    return 0;
}

static int read_run(read_state *rs, const qcow2_run *run)
{
    switch (run->type) {
    case SC_NORMAL:
        return queue_data(rs, run);
    case SC_COMPRESSED:
        /* Never encrypted: QEMU neither writes nor decrypts them. */
        return read_compressed(rs, run);
    case SC_ZERO_PLAIN:
    case SC_ZERO_ALLOC:
        memset(dest(rs, run->guest_offset), 0, (size_t)run->length);
        return 0;
    case SC_CORRUPT:
        return damaged(rs, run->guest_offset, run->length,
                       run->damage_start);
    default:
        return queue_backing(rs, run);
    }
}

static int read_qcow2(qcow2_image *img, uint64_t offset, uint8_t *buf,
                      size_t length, qcow2_damage_fn fn, void *ctx)
{
    read_state rs = { .img = img, .buf = buf, .start = offset,
                      .damage_fn = fn, .damage_ctx = ctx };
    uint64_t guest = offset, end = offset + length;
    int rc = 0;

    while (guest < end && rc == 0) {
        qcow2_run run;

        rc = qcow2_lookup_span(img, guest, end - guest, &run);
        if (rc == 0)
            rc = read_run(&rs, &run);
        guest += run.length;
    }
    if (rc == 0)
        rc = flush_data(&rs);
    if (rc == 0)
        rc = flush_backing(&rs);
    return rc;
}

int qcow2_read_salvage(qcow2_image *img, uint64_t offset, void *buf,
                       size_t length, qcow2_damage_fn fn, void *ctx)
{
    if (!range_inside(offset, length, img->size))
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "read of %zu bytes at 0x%" PRIx64
                          " is outside the disk (size 0x%" PRIx64 ")",
                          length, offset, img->size);
    if (length == 0)
        return 0;
    if (img->is_raw)
        return read_raw(img, offset, buf, length);
    return read_qcow2(img, offset, buf, length, fn, ctx);
}

int qcow2_read(qcow2_image *img, uint64_t offset, void *buf, size_t length)
{
    return qcow2_read_salvage(img, offset, buf, length, NULL, NULL);
}
