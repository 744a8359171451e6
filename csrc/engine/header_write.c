/*
 * Header writes (QEMU's qcow2_update_header and its small synced field
 * updates): the whole of cluster 0 rebuilt from the parsed header, or one
 * field pair switched with a single small write.
 */
#include <stdlib.h>
#include <string.h>

#include "format.h"

#define HEADER_V3_LENGTH    112u    /* what QEMU 7.2 writes for v3 */
#define FEATURE_NAME_BYTES  48u

/* Cluster 0 being assembled; `used` bytes so far, `room` at most. */
typedef struct header_buf {
    uint8_t *bytes;
    size_t used;
    size_t room;
    int overflow;
} header_buf;

static uint8_t *header_reserve(header_buf *hb, size_t len)
{
    uint8_t *at;
    if (hb->overflow || len > hb->room - hb->used) {
        hb->overflow = 1;
        return NULL;
    }
    at = hb->bytes + hb->used;
    hb->used += len;
    return at;
}

/* One extension: magic, length, data, zero padding to 8 bytes. */
static void header_ext_add(header_buf *hb, uint32_t magic, const void *data,
                           uint32_t len)
{
    uint8_t *at = header_reserve(hb, 8 + align_up(len, 8));
    if (!at)
        return;
    put_be32(at, magic);
    put_be32(at + 4, len);
    if (len)
        memcpy(at + 8, data, len);
}

static int is_known_extension(uint32_t magic)
{
    return magic == EXT_END || magic == EXT_BACKING_FORMAT ||
           magic == EXT_FEATURE_TABLE || magic == EXT_BITMAPS ||
           magic == EXT_CRYPTO_HEADER || magic == EXT_DATA_FILE;
}

/* The fixed fields (72 bytes for v2, up to 112 for v3). */
static void put_header_fields(const qcow2_image *img, uint8_t *b,
                              uint32_t header_length)
{
    const qcow2_header *h = &img->hdr;

    put_be32(b + 0, QCOW2_MAGIC);
    put_be32(b + 4, h->version);
    /* 8..19: backing name offset and size, set once it is placed */
    put_be32(b + 20, img->cluster_bits);
    put_be64(b + 24, h->size);
    put_be32(b + 32, h->crypt_method);
    put_be32(b + 36, h->l1_size);
    put_be64(b + 40, h->l1_table_offset);
    put_be64(b + 48, h->refcount_table_offset);
    put_be32(b + 56, h->refcount_table_clusters);
    put_be32(b + 60, h->nb_snapshots);
    put_be64(b + 64, h->snapshots_offset);
    if (h->version < 3)
        return;
    put_be64(b + 72, h->incompatible_features);
    put_be64(b + 80, h->compatible_features);
    put_be64(b + 88, h->autoclear_features);
    put_be32(b + 96, h->refcount_order);
    put_be32(b + 100, header_length);
    b[104] = h->compression_type;        /* 105..111 stay zero */
}

static void add_feature_table(header_buf *hb)
{
    uint8_t table[QCOW2_KNOWN_FEATURES][FEATURE_NAME_BYTES];

    memset(table, 0, sizeof table);
    for (size_t i = 0; i < QCOW2_KNOWN_FEATURES; i++) {
        table[i][0] = qcow2_known_features[i].type;
        table[i][1] = qcow2_known_features[i].bit;
        memcpy(&table[i][2], qcow2_known_features[i].name,
               strlen(qcow2_known_features[i].name));
    }
    header_ext_add(hb, EXT_FEATURE_TABLE, table, sizeof table);
}

static void add_extensions(const qcow2_image *img, header_buf *hb)
{
    const qcow2_ext_info *ext = &img->ext;

    if (ext->backing_format)
        header_ext_add(hb, EXT_BACKING_FORMAT, ext->backing_format,
                       (uint32_t)strlen(ext->backing_format));
    if (ext->data_file)
        header_ext_add(hb, EXT_DATA_FILE, ext->data_file,
                       (uint32_t)strlen(ext->data_file));
    if (ext->has_crypto_header) {
        uint8_t pointer[16];
        put_be64(pointer, ext->crypto_header_offset);
        put_be64(pointer + 8, ext->crypto_header_length);
        header_ext_add(hb, EXT_CRYPTO_HEADER, pointer, sizeof pointer);
    }
    /* 8 names cost 392 bytes: QEMU leaves them out of small clusters so
     * the backing name keeps its room. */
    if (img->hdr.version >= 3 && img->cluster_size > 4096)
        add_feature_table(hb);
    if (ext->has_bitmaps && ext->nb_bitmaps > 0) {
        uint8_t bitmaps[24];
        put_be32(bitmaps, ext->nb_bitmaps);
        put_be32(bitmaps + 4, 0);
        put_be64(bitmaps + 8, ext->bitmap_directory_size);
        put_be64(bitmaps + 16, ext->bitmap_directory_offset);
        header_ext_add(hb, EXT_BITMAPS, bitmaps, sizeof bitmaps);
    }
    for (size_t i = 0; i < img->n_exts; i++) {
        const qcow2_header_extension *e = &img->exts[i];
        if (!is_known_extension(e->magic))
            header_ext_add(hb, e->magic, e->data, e->length);
    }
    header_ext_add(hb, EXT_END, NULL, 0);
}

/* v3 bytes 112..header_length are fields from the future: carried over
 * exactly as the file has them. */
static int read_unknown_fields(qcow2_image *img, uint8_t *b,
                               uint32_t header_length)
{
    if (img->hdr.version < 3 || header_length <= HEADER_V3_LENGTH)
        return 0;
    return qcow2_read_meta(img, HEADER_V3_LENGTH, b + HEADER_V3_LENGTH,
                           header_length - HEADER_V3_LENGTH, "header");
}

int qcow2_header_rewrite(qcow2_image *img)
{
    uint32_t header_length = QCOW2_V2_HEADER_LENGTH;
    uint64_t backing_offset = 0;
    uint32_t backing_size = 0;
    header_buf hb;
    int rc;

    if (img->hdr.version >= 3)
        header_length = (uint32_t)max_u64(img->hdr.header_length,
                                          HEADER_V3_LENGTH);
    if (header_length > img->cluster_size)
        return qcow2_fail(img, QCOW2_E_INVALID, "header length %u exceeds "
                          "the cluster size", header_length);
    hb.bytes = calloc(1, img->cluster_size);
    if (!hb.bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    hb.room = img->cluster_size;
    hb.used = header_length;
    hb.overflow = 0;

    rc = read_unknown_fields(img, hb.bytes, header_length);
    if (rc < 0)
        goto out;
    put_header_fields(img, hb.bytes, header_length);
    add_extensions(img, &hb);
    if (img->backing_name) {
        size_t len = strlen(img->backing_name);
        uint8_t *at = len > QCOW2_MAX_BACKING_NAME ? NULL
                                                   : header_reserve(&hb, len);
        if (at) {
            memcpy(at, img->backing_name, len);
            backing_offset = (uint64_t)(at - hb.bytes);
            backing_size = (uint32_t)len;
        } else {
            hb.overflow = 1;
        }
    }
    if (hb.overflow) {
        rc = qcow2_fail(img, QCOW2_E_INVALID, "header, extensions and "
                        "backing file name do not fit in a %llu-byte "
                        "cluster", (unsigned long long)img->cluster_size);
        goto out;
    }
    put_be64(hb.bytes + 8, backing_offset);
    put_be32(hb.bytes + 16, backing_size);

    /* One write: a crash leaves the old header or the new one (a sector
     * write is atomic; larger headers are QEMU's risk too). */
    rc = qcow2_write_checked(img, OVERLAP_HEADER, "header", 0, hb.bytes,
                             hb.used);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0) {
        img->hdr.backing_file_offset = backing_offset;
        img->hdr.backing_file_size = backing_size;
        if (img->hdr.version >= 3)
            img->hdr.header_length = header_length;
    }
out:
    free(hb.bytes);
    return rc;
}

/* One synced write of `len` header bytes at `offset`. */
static int header_write_field(qcow2_image *img, uint64_t offset,
                              const uint8_t *bytes, size_t len)
{
    /* An open for repair takes tables that overlap the header cluster
     * (QEMU does): the header's own fields are still the header's to
     * write, as QEMU's header updates are never overlap-checked. */
    int ignore = img->open_for_repair ? OVERLAP_ALL : OVERLAP_HEADER;
    int rc = qcow2_write_checked(img, ignore, "header", offset, bytes, len);
    return rc < 0 ? rc : qcow2_barrier(img);
}

int qcow2_header_set_feature(qcow2_image *img, int kind, int bit, int on)
{
    uint64_t *field, updated, mask;
    uint8_t bytes[8];
    int rc;

    if (kind < 0 || kind > 2 || bit < 0 || bit > 63)
        return qcow2_fail(img, QCOW2_E_INVALID, "feature kind %d bit %d",
                          kind, bit);
    if (img->hdr.version < 3)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "feature bits need a "
                          "version 3 image");
    field = kind == 0 ? &img->hdr.incompatible_features
          : kind == 1 ? &img->hdr.compatible_features
                      : &img->hdr.autoclear_features;
    mask = 1ull << bit;
    updated = on ? (*field | mask) : (*field & ~mask);
    put_be64(bytes, updated);
    rc = header_write_field(img, 72 + 8 * (uint64_t)kind, bytes, 8);
    if (rc == 0)
        *field = updated;
    return rc;
}

int qcow2_header_set_l1(qcow2_image *img, uint64_t l1_offset,
                        uint32_t l1_size)
{
    uint8_t bytes[12];
    int rc;

    put_be32(bytes, l1_size);
    put_be64(bytes + 4, l1_offset);
    rc = header_write_field(img, 36, bytes, sizeof bytes);
    if (rc == 0) {
        img->hdr.l1_size = l1_size;
        img->hdr.l1_table_offset = l1_offset;
    }
    return rc;
}

int qcow2_header_set_reftable(qcow2_image *img, uint64_t offset,
                              uint32_t clusters)
{
    uint8_t bytes[12];
    int rc;

    put_be64(bytes, offset);
    put_be32(bytes + 8, clusters);
    rc = header_write_field(img, 48, bytes, sizeof bytes);
    if (rc == 0) {
        img->hdr.refcount_table_offset = offset;
        img->hdr.refcount_table_clusters = clusters;
    }
    return rc;
}

int qcow2_header_set_snapshots(qcow2_image *img, uint64_t offset,
                               uint32_t count)
{
    uint8_t bytes[12];
    int rc;

    put_be32(bytes, count);
    put_be64(bytes + 4, offset);
    rc = header_write_field(img, 60, bytes, sizeof bytes);
    if (rc == 0) {
        img->hdr.nb_snapshots = count;
        img->hdr.snapshots_offset = offset;
    }
    return rc;
}

int qcow2_header_set_size(qcow2_image *img, uint64_t size)
{
    uint8_t bytes[8];
    int rc;

    put_be64(bytes, size);
    rc = header_write_field(img, 24, bytes, sizeof bytes);
    if (rc == 0)
        img->hdr.size = size;
    return rc;
}
