/*
 * The qcow2 header and its extensions: parse, validate, expose.
 *
 * Everything in cluster 0 comes from a possibly hostile file. Each field is
 * checked against QEMU's own limits at open (block/qcow2.c, qcow2_do_open)
 * plus a few QEMU lacks: the tables it names must be cluster aligned, lie
 * inside the file and keep clear of cluster 0 and of each other.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

#define FEATURE_RECORD_BYTES    48
#define BITMAPS_EXT_BYTES       24
#define CRYPTO_EXT_BYTES        16
#define MAX_BITMAPS             65535u
#define MAX_BITMAP_DIRECTORY    (1024ull * 65535)
#define COMPRESSION_TYPE_OFFSET 104

const qcow2_known_feature qcow2_known_features[QCOW2_KNOWN_FEATURES] = {
    { 0, 0, "dirty bit" },
    { 0, 1, "corrupt bit" },
    { 0, 2, "external data file" },
    { 0, 3, "compression type" },
    { 0, 4, "extended L2 entries" },
    { 1, 0, "lazy refcounts" },
    { 2, 0, "bitmaps" },
    { 2, 1, "raw external data" },
};

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

/* ---- Fixed fields --------------------------------------------------------- */

static void parse_v2_fields(qcow2_header *h, const uint8_t *b)
{
    h->magic = be32(b + 0);
    h->version = be32(b + 4);
    h->backing_file_offset = be64(b + 8);
    h->backing_file_size = be32(b + 16);
    h->cluster_bits = be32(b + 20);
    h->size = be64(b + 24);
    h->crypt_method = be32(b + 32);
    h->l1_size = be32(b + 36);
    h->l1_table_offset = be64(b + 40);
    h->refcount_table_offset = be64(b + 48);
    h->refcount_table_clusters = be32(b + 56);
    h->nb_snapshots = be32(b + 60);
    h->snapshots_offset = be64(b + 64);
    /* v2 has no feature bits and a fixed refcount width of 16 */
    h->incompatible_features = 0;
    h->compatible_features = 0;
    h->autoclear_features = 0;
    h->refcount_order = 4;
    h->header_length = QCOW2_V2_HEADER_LENGTH;
    h->compression_type = 0;
}

static void parse_v3_fields(qcow2_header *h, const uint8_t *b)
{
    h->incompatible_features = be64(b + 72);
    h->compatible_features = be64(b + 80);
    h->autoclear_features = be64(b + 88);
    h->refcount_order = be32(b + 96);
    h->header_length = be32(b + 100);
}

/* Magic, version, cluster size and header length: what must hold before
 * cluster 0 can be read at all. */
static int load_fixed_header(qcow2_image *img)
{
    uint8_t fixed[QCOW2_V3_MIN_HEADER_LENGTH] = { 0 };
    qcow2_header *h = &img->hdr;
    uint64_t want = min_u64(img->file_size, sizeof fixed);
    int ret;

    ret = qcow2_read_meta(img, 0, fixed, (size_t)want, "header");
    if (ret < 0)
        return ret;
    if (want < 4 || be32(fixed) != QCOW2_MAGIC)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "not a qcow2 image: magic 0x%08x",
                          want < 4 ? 0 : be32(fixed));
    if (want >= 8 && be32(fixed + 4) != 2 && be32(fixed + 4) != 3)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "unsupported qcow2 version %u", be32(fixed + 4));
    if (want < QCOW2_V2_HEADER_LENGTH ||
        (be32(fixed + 4) == 3 && want < QCOW2_V3_MIN_HEADER_LENGTH))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "file too short for a qcow2 header (%llu bytes)",
                          ull(img->file_size));

    parse_v2_fields(h, fixed);
    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS ||
        h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "cluster_bits %u out of range (%u..%u)",
                          h->cluster_bits, QCOW2_MIN_CLUSTER_BITS,
                          QCOW2_MAX_CLUSTER_BITS);
    img->cluster_bits = h->cluster_bits;
    img->cluster_size = 1ull << h->cluster_bits;

    if (h->version == 3) {
        parse_v3_fields(h, fixed);
        if (h->header_length < QCOW2_V3_MIN_HEADER_LENGTH)
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "header_length %u too short (minimum %u)",
                              h->header_length, QCOW2_V3_MIN_HEADER_LENGTH);
        if (h->header_length > img->cluster_size)
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "header_length %u exceeds the cluster size %llu",
                              h->header_length, ull(img->cluster_size));
        if (h->header_length > img->file_size)
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "header_length %u runs past the end of the "
                              "file (%llu bytes)", h->header_length,
                              ull(img->file_size));
    }
    return 0;
}

/* Cluster 0 as QEMU sees it: bytes past the end of the file read as 0. */
static int read_cluster0(qcow2_image *img, uint8_t **out)
{
    uint8_t *cluster0 = calloc(1, (size_t)img->cluster_size);
    uint64_t have = min_u64(img->cluster_size, img->file_size);
    int ret;

    *out = NULL;
    if (!cluster0)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for cluster 0");
    ret = qcow2_read_meta(img, 0, cluster0, (size_t)have, "header cluster");
    if (ret < 0) {
        free(cluster0);
        return ret;
    }
    *out = cluster0;
    return 0;
}

/* ---- Extensions ------------------------------------------------------------ */

static int add_extension(qcow2_image *img, uint32_t magic, uint32_t length,
                         uint64_t file_offset, const uint8_t *data)
{
    qcow2_header_extension *grown, *ext;

    grown = realloc(img->exts, (img->n_exts + 1) * sizeof *grown);
    if (!grown)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for extensions");
    img->exts = grown;
    ext = &img->exts[img->n_exts];
    ext->magic = magic;
    ext->length = length;
    ext->file_offset = file_offset;
    ext->data = malloc(length ? length : 1);
    if (!ext->data)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for extensions");
    memcpy(ext->data, data, length);
    img->n_exts++;
    return 0;
}

/* The occurrence of `magic` after `prev` (the first with prev NULL). */
static const qcow2_header_extension *next_extension(const qcow2_image *img,
                                                    uint32_t magic,
                                                    const qcow2_header_extension *prev)
{
    for (size_t i = prev ? (size_t)(prev - img->exts) + 1 : 0;
         i < img->n_exts; i++) {
        if (img->exts[i].magic == magic)
            return &img->exts[i];
    }
    return NULL;
}

/* The extension of this magic that counts: the last one, as in QEMU 7.2,
 * which takes a repeated known extension, each one overwriting the one
 * before (every one of them is validated: see validate_each). */
static const qcow2_header_extension *find_extension(const qcow2_image *img,
                                                    uint32_t magic)
{
    const qcow2_header_extension *last = NULL, *e = NULL;

    while ((e = next_extension(img, magic, e)) != NULL)
        last = e;
    return last;
}

/* Every occurrence of `magic` through `check`: QEMU validates each one as
 * it reads it, so a bad early copy is refused even though a later one
 * overrides it. */
static int validate_each(qcow2_image *img, uint32_t magic,
                         int (*check)(qcow2_image *,
                                      const qcow2_header_extension *))
{
    const qcow2_header_extension *e = NULL;
    int ret;

    while ((e = next_extension(img, magic, e)) != NULL)
        if ((ret = check(img, e)) < 0)
            return ret;
    return 0;
}

/*
 * Walk the extensions from `offset` until the end marker or area_end (the
 * backing name, or the end of cluster 0), keeping every one, unknown ones
 * included, so a header rewrite can carry them over.
 */
static int walk_extensions(qcow2_image *img, const uint8_t *cluster0,
                           uint64_t offset, uint64_t area_end)
{
    while (offset < area_end) {
        uint32_t magic, length;
        uint64_t data_offset = offset + 8;
        int ret;

        if (data_offset > area_end)
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "header extension at 0x%llx crosses the end of "
                              "the extension area (0x%llx)", ull(offset),
                              ull(area_end));
        magic = be32(cluster0 + offset);
        length = be32(cluster0 + offset + 4);
        /* QEMU checks the length before the magic: the end marker's too
         * ("Header extension too large"); a length that fits is ignored. */
        if (length > area_end - data_offset)
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "header extension 0x%08x%s at 0x%llx too large "
                              "(length %u, extension area ends at 0x%llx)",
                              magic, magic == EXT_END
                                         ? " (end-of-extensions marker)" : "",
                              ull(offset), length, ull(area_end));
        if (magic == EXT_END)
            return 0;
        if (!range_inside(data_offset, length, img->file_size))
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "header extension 0x%08x at 0x%llx runs past "
                              "the end of the file", magic, ull(offset));
        ret = add_extension(img, magic, length, data_offset,
                            cluster0 + data_offset);
        if (ret < 0)
            return ret;
        offset = data_offset + align_up(length, 8);
    }
    return 0;
}

/* The feature-name table: 48-byte records; a trailing partial record is
 * ignored, as is every record past the first empty name (QEMU stops there). */
static int parse_feature_table(qcow2_image *img,
                               const qcow2_header_extension *ext)
{
    size_t count = ext->length / FEATURE_RECORD_BYTES;

    if (count == 0)
        return 0;
    img->features = calloc(count, sizeof *img->features);
    if (!img->features)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for features");
    for (size_t i = 0; i < count; i++) {
        const uint8_t *record = ext->data + i * FEATURE_RECORD_BYTES;
        qcow2_feature_name *feature = &img->features[img->n_features];

        if (record[2] == '\0')
            break;
        feature->type = record[0];
        feature->bit = record[1];
        memcpy(feature->name, record + 2, FEATURE_RECORD_BYTES - 2);
        feature->name[FEATURE_RECORD_BYTES - 2] = '\0';
        img->n_features++;
    }
    return 0;
}

/* A string extension as an owned C string (no NUL on disk; an embedded NUL
 * ends it). NULL in *out for an empty string. */
static int extension_string(qcow2_image *img,
                            const qcow2_header_extension *ext, char **out)
{
    size_t length = strnlen((const char *)ext->data, ext->length);

    *out = NULL;
    if (length == 0)
        return 0;
    *out = malloc(length + 1);
    if (!*out)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for a name");
    memcpy(*out, ext->data, length);
    (*out)[length] = '\0';
    return 0;
}

/* ---- Feature bits ----------------------------------------------------------- */

/* Unknown incompatible bits: the image may mean something we would read
 * wrongly, so it is refused, naming the bits as the image names them. */
static int report_incompatible(qcow2_image *img, uint64_t unknown)
{
    char list[320];
    size_t used = 0;

    list[0] = '\0';
    for (int bit = 0; bit < 64 && used < sizeof list; bit++) {
        const char *name;
        int n;

        if (!(unknown & (1ull << bit)))
            continue;
        name = qcow2_feature_bit_name(img, 0, bit);
        if (name)
            n = snprintf(list + used, sizeof list - used,
                         "%sunsupported incompatible feature '%s' (bit %d)",
                         used ? ", " : "", name, bit);
        else
            n = snprintf(list + used, sizeof list - used,
                         "%sunknown incompatible feature bit %d",
                         used ? ", " : "", bit);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "%s", list);
}

static int check_field_values(qcow2_image *img)
{
    const qcow2_header *h = &img->hdr;
    int has_compression_bit = !!(h->incompatible_features &
                                 INCOMPAT_COMPRESSION);

    if (h->refcount_order > QCOW2_REFCOUNT_ORDER_MAX)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "refcount_order %u out of range (0..6)",
                          h->refcount_order);
    if (h->crypt_method > CRYPT_LUKS)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "crypt_method %u out of range (0..2)",
                          h->crypt_method);
    if (h->compression_type > COMPRESSION_ZSTD)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "unknown compression_type %u",
                          h->compression_type);
    if (h->compression_type != COMPRESSION_ZLIB && !has_compression_bit)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "compression_type %u without the compression type "
                          "incompatible bit", h->compression_type);
    if (h->compression_type == COMPRESSION_ZLIB && has_compression_bit)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "compression type incompatible bit set with "
                          "compression_type 0 (zlib)");
    /* Subclusters are cluster/32 and may not be smaller than a sector. */
    if ((h->incompatible_features & INCOMPAT_EXTL2) && h->cluster_bits < 14)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "extended L2 entries need cluster_bits >= 14, "
                          "not %u", h->cluster_bits);
    if (!(h->incompatible_features & INCOMPAT_DATA_FILE) &&
        (h->autoclear_features & AUTOCLEAR_DATA_FILE_RAW))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "raw external data bit set without the external "
                          "data file bit");
    return 0;
}

/* ---- Special extensions ------------------------------------------------------ */

static int check_backing_format(qcow2_image *img,
                                const qcow2_header_extension *ext)
{
    if (ext->length > QCOW2_MAX_BACKING_FORMAT)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "backing format extension length %u too long "
                          "(max %u)", ext->length, QCOW2_MAX_BACKING_FORMAT);
    return 0;
}

static int load_backing_format(qcow2_image *img)
{
    const qcow2_header_extension *ext = find_extension(img,
                                                       EXT_BACKING_FORMAT);
    int ret;

    if (!ext)
        return 0;
    if ((ret = validate_each(img, EXT_BACKING_FORMAT,
                             check_backing_format)) < 0)
        return ret;
    ret = extension_string(img, ext, &img->backing_format_ext);
    img->ext.backing_format = img->backing_format_ext;
    return ret;
}

static int load_data_file_name(qcow2_image *img)
{
    const qcow2_header_extension *ext = find_extension(img, EXT_DATA_FILE);
    int ret;

    if (!ext)
        return 0;
    ret = extension_string(img, ext, &img->data_file_ext);
    img->ext.data_file = img->data_file_ext;
    return ret;
}

static int check_crypto_header(qcow2_image *img,
                               const qcow2_header_extension *ext)
{
    if (img->hdr.crypt_method != CRYPT_LUKS)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "crypto header extension with crypt_method %u "
                          "(only LUKS has one)", img->hdr.crypt_method);
    if (ext->length != CRYPTO_EXT_BYTES)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "crypto header extension length %u (expected %u)",
                          ext->length, CRYPTO_EXT_BYTES);
    if (!is_aligned(be64(ext->data), img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "crypto header offset 0x%llx is not cluster "
                          "aligned", ull(be64(ext->data)));
    return 0;
}

/* The LUKS header area: required with LUKS, forbidden without it. */
static int load_crypto_header(qcow2_image *img)
{
    const qcow2_header_extension *ext = find_extension(img,
                                                       EXT_CRYPTO_HEADER);
    uint64_t offset, length;
    int ret;

    if (!ext) {
        if (img->hdr.crypt_method == CRYPT_LUKS)
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "LUKS encryption (crypt_method 2) without a "
                              "crypto header extension");
        return 0;
    }
    if ((ret = validate_each(img, EXT_CRYPTO_HEADER,
                             check_crypto_header)) < 0)
        return ret;
    offset = be64(ext->data);
    length = be64(ext->data + 8);
    img->ext.has_crypto_header = 1;
    img->ext.crypto_header_offset = offset;
    img->ext.crypto_header_length = length;
    return qcow2_check_table(img, "crypto header", offset, length);
}

/* Bitmaps are trusted only with the autoclear bit (a program unaware of
 * bitmaps cleared it while writing); otherwise QEMU ignores them too. */
static int check_bitmaps_extension(qcow2_image *img,
                                   const qcow2_header_extension *ext)
{
    uint32_t nb_bitmaps, reserved;
    uint64_t directory_size;

    if (ext->length != BITMAPS_EXT_BYTES)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmaps extension length %u (expected %u)",
                          ext->length, BITMAPS_EXT_BYTES);
    if (!(img->hdr.autoclear_features & AUTOCLEAR_BITMAPS))
        return 0;
    nb_bitmaps = be32(ext->data);
    reserved = be32(ext->data + 4);
    directory_size = be64(ext->data + 8);
    if (reserved != 0)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmaps extension reserved field is 0x%08x",
                          reserved);
    if (nb_bitmaps == 0 || nb_bitmaps > MAX_BITMAPS)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmaps extension nb_bitmaps %u out of range "
                          "(1..%u)", nb_bitmaps, MAX_BITMAPS);
    if (directory_size > MAX_BITMAP_DIRECTORY)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap directory size %llu too large (max %llu)",
                          ull(directory_size), ull(MAX_BITMAP_DIRECTORY));
    return 0;
}

static int load_bitmaps_extension(qcow2_image *img)
{
    const qcow2_header_extension *ext = find_extension(img, EXT_BITMAPS);
    uint32_t nb_bitmaps;
    uint64_t directory_size, directory_offset;
    int ret;

    if (!ext)
        return 0;
    if ((ret = validate_each(img, EXT_BITMAPS, check_bitmaps_extension)) < 0)
        return ret;
    if (!(img->hdr.autoclear_features & AUTOCLEAR_BITMAPS))
        return 0;
    nb_bitmaps = be32(ext->data);
    directory_size = be64(ext->data + 8);
    directory_offset = be64(ext->data + 16);
    img->ext.has_bitmaps = 1;
    img->ext.nb_bitmaps = nb_bitmaps;
    img->ext.bitmap_directory_size = directory_size;
    img->ext.bitmap_directory_offset = directory_offset;
    return qcow2_check_table(img, "bitmap directory", directory_offset,
                             directory_size);
}

static int load_special_extensions(qcow2_image *img)
{
    const qcow2_header_extension *features;
    int ret;

    features = find_extension(img, EXT_FEATURE_TABLE);
    if (features && (ret = parse_feature_table(img, features)) < 0)
        return ret;
    if ((ret = load_backing_format(img)) < 0 ||
        (ret = load_data_file_name(img)) < 0 ||
        (ret = load_crypto_header(img)) < 0 ||
        (ret = load_bitmaps_extension(img)) < 0)
        return ret;
    return 0;
}

/* ---- Geometry and tables ------------------------------------------------------ */

static void set_geometry(qcow2_image *img)
{
    const qcow2_header *h = &img->hdr;

    qcow2_geometry_set(img, h->cluster_bits,
                       (h->incompatible_features & INCOMPAT_EXTL2) != 0,
                       h->refcount_order);
    /* QEMU counts whole sectors and drops a partial last one. */
    img->size = h->size & ~511ull;
    img->compression_type = h->compression_type;
}

int qcow2_check_table(qcow2_image *img, const char *what, uint64_t offset,
                      uint64_t length)
{
    if (!is_aligned(offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s offset 0x%llx is not cluster aligned", what,
                          ull(offset));
    if (length == 0)
        return 0;
    if (!range_inside(offset, length, img->file_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s at 0x%llx (%llu bytes) lies outside the file "
                          "(%llu bytes)", what, ull(offset), ull(length),
                          ull(img->file_size));
    if (offset < img->cluster_size)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s at 0x%llx overlaps the header cluster", what,
                          ull(offset));
    return 0;
}

int qcow2_check_tables_apart(qcow2_image *img, const char *what_a,
                             uint64_t a, uint64_t a_length,
                             const char *what_b, uint64_t b,
                             uint64_t b_length)
{
    if (ranges_overlap(a, a_length, b, b_length))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s at 0x%llx (%llu bytes) overlaps the %s at "
                          "0x%llx (%llu bytes)", what_a, ull(a),
                          ull(a_length), what_b, ull(b), ull(b_length));
    return 0;
}

/*
 * Where the L1, refcount and snapshot tables lie. A plain open refuses a
 * table outside the file, over the header cluster or over another table;
 * an open for repair asks only what QEMU's qcow2_validate_table asks
 * (aligned, ending below 2^63), as qemu-img check -r does: the rest is
 * what the check reports and the repair mends, reading past the end of
 * the file as zeroes (image.c). A read-only open is as lenient for the
 * refcount and snapshot tables, which the active disk does not need (QEMU
 * opens such images), and keeps what the strict check refused as damage
 * (damage.c); the L1 table stays strict there, since a disk mapped by a
 * table that is not in the file would silently read as zeroes.
 */
static int check_table_place(qcow2_image *img, const char *what,
                             uint64_t offset, uint64_t length,
                             int tolerable)
{
    if (!img->open_for_repair && !(tolerable && img->read_only))
        return qcow2_check_table(img, what, offset, length);
    if (!is_aligned(offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s offset 0x%llx is not cluster aligned", what,
                          ull(offset));
    if (offset > (uint64_t)INT64_MAX - length)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s at 0x%llx (%llu bytes) lies past any file",
                          what, ull(offset), ull(length));
    if (!img->open_for_repair &&
        qcow2_check_table(img, what, offset, length) < 0)
        qcow2_note_damage(img);
    return 0;
}

/* Every pair involves the refcount or the snapshot table. */
static int tables_apart(qcow2_image *img, const char *what_a, uint64_t a,
                        uint64_t a_length, const char *what_b, uint64_t b,
                        uint64_t b_length)
{
    int ret;

    if (img->open_for_repair)
        return 0;
    ret = qcow2_check_tables_apart(img, what_a, a, a_length, what_b, b,
                                   b_length);
    if (ret < 0 && img->read_only) {
        qcow2_note_damage(img);
        return 0;
    }
    return ret;
}

static int check_refcount_table(qcow2_image *img)
{
    const qcow2_header *h = &img->hdr;
    uint64_t max_clusters = QCOW2_MAX_REFTABLE_BYTES >> img->cluster_bits;

    /* QEMU opens an empty table, and check -r all rebuilds one */
    if (h->refcount_table_clusters == 0 && !img->open_for_repair)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "refcount_table_clusters is 0");
    if (h->refcount_table_clusters > max_clusters)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "refcount_table_clusters %u too large (max %llu)",
                          h->refcount_table_clusters, ull(max_clusters));
    return check_table_place(img, "refcount table", h->refcount_table_offset,
                             (uint64_t)h->refcount_table_clusters <<
                                 img->cluster_bits, 1);
}

/* The snapshot table's length is known only once parsed (snapshot.c checks
 * it whole); here its fixed part, 40 bytes an entry, must fit. */
static int check_snapshot_table(qcow2_image *img)
{
    const qcow2_header *h = &img->hdr;

    if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "nb_snapshots %u too large (max %u)",
                          h->nb_snapshots, QCOW2_MAX_SNAPSHOTS);
    return check_table_place(img, "snapshot table", h->snapshots_offset,
                             (uint64_t)h->nb_snapshots * 40, 1);
}

static int check_l1_table(qcow2_image *img)
{
    const qcow2_header *h = &img->hdr;
    uint64_t needed;

    if (h->l1_size > QCOW2_MAX_L1_BYTES / 8)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "l1_size %u too large (max %u entries)",
                          h->l1_size, QCOW2_MAX_L1_BYTES / 8);
    if (qcow2_l1_entries_needed(img, h->size, &needed) < 0)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "virtual size %llu too large", ull(h->size));
    if (h->l1_size < needed)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "l1_size %u too small for virtual size %llu "
                          "(needs %llu entries)", h->l1_size, ull(h->size),
                          ull(needed));
    return check_table_place(img, "L1 table", h->l1_table_offset,
                             (uint64_t)h->l1_size * 8, 0);
}

static int check_tables(qcow2_image *img)
{
    const qcow2_header *h = &img->hdr;
    uint64_t reftable_bytes = (uint64_t)h->refcount_table_clusters <<
                              img->cluster_bits;
    uint64_t l1_bytes = (uint64_t)h->l1_size * 8;
    uint64_t snapshot_bytes = (uint64_t)h->nb_snapshots * 40;
    int ret;

    if ((ret = check_refcount_table(img)) < 0 ||
        (ret = check_snapshot_table(img)) < 0 ||
        (ret = check_l1_table(img)) < 0)
        return ret;
    if ((ret = tables_apart(img, "L1 table", h->l1_table_offset,
                                        l1_bytes, "refcount table",
                                        h->refcount_table_offset,
                                        reftable_bytes)) < 0 ||
        (ret = tables_apart(img, "snapshot table",
                                        h->snapshots_offset, snapshot_bytes,
                                        "L1 table", h->l1_table_offset,
                                        l1_bytes)) < 0 ||
        (ret = tables_apart(img, "snapshot table",
                                        h->snapshots_offset, snapshot_bytes,
                                        "refcount table",
                                        h->refcount_table_offset,
                                        reftable_bytes)) < 0)
        return ret;
    return 0;
}

/* ---- Backing file name ---------------------------------------------------------- */

/* Where the extension area ends: at the backing name, else cluster 0's end. */
static int check_backing_name_place(qcow2_image *img, uint64_t *area_end)
{
    const qcow2_header *h = &img->hdr;
    uint64_t max_length;

    *area_end = img->cluster_size;
    if (h->backing_file_offset == 0)
        return 0;
    if (h->backing_file_offset > img->cluster_size)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "backing_file_offset 0x%llx is beyond cluster 0",
                          ull(h->backing_file_offset));
    /* QEMU takes a name inside the header too (the extension area is
     * then empty; with backing_file_size 0 there is no backing file) */
    max_length = min_u64(QCOW2_MAX_BACKING_NAME,
                         img->cluster_size - h->backing_file_offset);
    if (h->backing_file_size > max_length)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "backing_file_size %u too long (max %llu)",
                          h->backing_file_size, ull(max_length));
    if (!range_inside(h->backing_file_offset, h->backing_file_size,
                      img->file_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "backing file name at 0x%llx runs past the end of "
                          "the file", ull(h->backing_file_offset));
    *area_end = h->backing_file_offset;
    return 0;
}

/* The name as a C string; an empty one (or one starting with NUL, as QEMU
 * reads it) means no backing file. */
static int load_backing_name(qcow2_image *img, const uint8_t *cluster0)
{
    const qcow2_header *h = &img->hdr;
    const char *name = (const char *)cluster0 + h->backing_file_offset;
    size_t length;

    if (h->backing_file_offset == 0)
        return 0;
    length = strnlen(name, h->backing_file_size);
    if (length == 0)
        return 0;
    img->backing_name = malloc(length + 1);
    if (!img->backing_name)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for a name");
    memcpy(img->backing_name, name, length);
    img->backing_name[length] = '\0';
    return 0;
}

/* ---- Load / free -------------------------------------------------------------- */

static int parse_cluster0(qcow2_image *img, const uint8_t *cluster0)
{
    qcow2_header *h = &img->hdr;
    uint64_t ext_start = h->header_length, area_end;
    uint64_t unknown_incompatible;
    int ret, walk_ret;

    if (h->version == 3 && h->header_length > COMPRESSION_TYPE_OFFSET)
        h->compression_type = cluster0[COMPRESSION_TYPE_OFFSET];

    ret = check_backing_name_place(img, &area_end);
    if (ret < 0)
        return ret;
    /* Unknown incompatible bits win over a broken extension area: the
     * image may be fine for a reader that knows them (QEMU's order). */
    walk_ret = walk_extensions(img, cluster0, ext_start, area_end);
    unknown_incompatible = h->incompatible_features & ~INCOMPAT_KNOWN;
    if (unknown_incompatible) {
        const qcow2_header_extension *table =
            find_extension(img, EXT_FEATURE_TABLE);
        if (table && parse_feature_table(img, table) < 0)
            return img->err.code;
        return report_incompatible(img, unknown_incompatible);
    }
    if (walk_ret < 0)
        return walk_ret;
    if ((ret = check_field_values(img)) < 0 ||
        (ret = load_special_extensions(img)) < 0)
        return ret;
    /* A data-file image without a name is refused by image.c, which may
     * one day take the name from an option. */
    set_geometry(img);
    if ((ret = check_tables(img)) < 0)
        return ret;
    return load_backing_name(img, cluster0);
}

int qcow2_header_load(qcow2_image *img)
{
    uint8_t *cluster0;
    int ret;

    ret = load_fixed_header(img);
    if (ret < 0)
        return ret;
    ret = read_cluster0(img, &cluster0);
    if (ret < 0)
        return ret;
    ret = parse_cluster0(img, cluster0);
    free(cluster0);
    return ret;
}

void qcow2_header_free(qcow2_image *img)
{
    for (size_t i = 0; i < img->n_exts; i++)
        free(img->exts[i].data);
    free(img->exts);
    img->exts = NULL;
    img->n_exts = 0;
    free(img->features);
    img->features = NULL;
    img->n_features = 0;
    free(img->backing_format_ext);
    img->backing_format_ext = NULL;
    free(img->data_file_ext);
    img->data_file_ext = NULL;
    free(img->backing_name);
    img->backing_name = NULL;
    memset(&img->ext, 0, sizeof img->ext);
}

/* ---- Public getters --------------------------------------------------------------- */

const qcow2_header *qcow2_get_header(const qcow2_image *img)
{
    return img->is_raw ? NULL : &img->hdr;
}

size_t qcow2_extension_count(const qcow2_image *img)
{
    return img->n_exts;
}

const qcow2_header_extension *qcow2_extension(const qcow2_image *img,
                                              size_t index)
{
    return index < img->n_exts ? &img->exts[index] : NULL;
}

size_t qcow2_feature_name_count(const qcow2_image *img)
{
    return img->n_features;
}

const qcow2_feature_name *qcow2_feature_name_at(const qcow2_image *img,
                                                size_t index)
{
    return index < img->n_features ? &img->features[index] : NULL;
}

const char *qcow2_feature_bit_name(const qcow2_image *img, int kind, int bit)
{
    if (img) {
        for (size_t i = 0; i < img->n_features; i++) {
            const qcow2_feature_name *feature = &img->features[i];
            if (feature->type == kind && feature->bit == bit &&
                feature->name[0] != '\0')
                return feature->name;
        }
    }
    for (size_t i = 0; i < QCOW2_KNOWN_FEATURES;
         i++) {
        if (qcow2_known_features[i].type == kind &&
            qcow2_known_features[i].bit == bit)
            return qcow2_known_features[i].name;
    }
    return NULL;
}

const qcow2_ext_info *qcow2_get_ext_info(const qcow2_image *img)
{
    return &img->ext;
}
