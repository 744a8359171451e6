/*
 * A persistent dirty bitmap's dirty ranges (format doc section 8), read
 * side: the bitmap table is validated entry by entry when the iteration
 * starts, then streamed. Memory is bounded whatever the image claims: one
 * chunk of the table and one data cluster at a time.
 *
 * Table entry: bits 9..55 the host offset of a data cluster; when it is
 * 0, bit 0 says the whole cluster's bits are ones (1) or zeroes (0).
 * Data: bit n covers guest bytes [n * g, (n + 1) * g), LSB first in each
 * byte.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "format.h"

#define BME_OFFSET_MASK     0x00fffffffffffe00ull
#define BME_RESERVED_MASK   0xff000000000001feull
#define BME_ALL_ONES        1ull
#define BME_MAX_TABLE_SIZE  0x8000000u         /* entries (QEMU's limit) */
#define BME_TYPE_DIRTY      1u
#define BME_KNOWN_FLAGS     (QCOW2_BITMAP_IN_USE | QCOW2_BITMAP_AUTO)
#define TABLE_CHUNK         512u               /* entries read at once */

struct qcow2_bitmap_iter {
    char *name;                 /* for messages */
    uint64_t table_offset;
    uint32_t table_size;
    uint32_t granularity_bits;
    uint64_t disk_size;         /* guest bytes the bitmap covers */
    uint64_t total_bits;
    uint64_t bits_per_cluster;
    uint64_t pos;               /* next bit to look at */
    /* one chunk of the table */
    uint64_t chunk[TABLE_CHUNK];
    uint64_t chunk_first;       /* index of chunk[0] */
    uint32_t chunk_count;       /* 0: nothing loaded */
    /* one data cluster */
    uint8_t *data;
    uint64_t data_index;        /* table index of the loaded cluster */
    int data_loaded;
};

void qcow2_bitmap_extents_free(qcow2_bitmap_iter *it)
{
    if (!it)
        return;
    free(it->name);
    free(it->data);
    free(it);
}

/* Table entry `index` (< table_size), through the chunk. */
static int table_entry(qcow2_image *img, qcow2_bitmap_iter *it,
                       uint64_t index, uint64_t *entry)
{
    if (it->chunk_count == 0 || index < it->chunk_first ||
        index >= it->chunk_first + it->chunk_count) {
        uint64_t first = index - index % TABLE_CHUNK;
        uint32_t count = (uint32_t)min_u64(TABLE_CHUNK,
                                           it->table_size - first);
        uint8_t raw[TABLE_CHUNK * 8];
        int rc;

        it->chunk_count = 0;
        rc = qcow2_read_meta(img, it->table_offset + first * 8, raw,
                             (size_t)count * 8, "bitmap table");
        if (rc < 0)
            return rc;
        for (uint32_t i = 0; i < count; i++)
            it->chunk[i] = be64(raw + 8 * i);
        it->chunk_first = first;
        it->chunk_count = count;
    }
    *entry = it->chunk[index - it->chunk_first];
    return 0;
}

/* One entry as the format allows it: reserved bits clear, an aligned
 * data cluster inside the file, no all-ones flag beside an offset. */
static int check_entry(qcow2_image *img, const qcow2_bitmap_iter *it,
                       uint64_t index, uint64_t entry, uint64_t file_size)
{
    uint64_t offset = entry & BME_OFFSET_MASK;

    if (entry & BME_RESERVED_MASK)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s' table entry %" PRIu64 " (0x%016"
                          PRIx64 ") has reserved bits set", it->name,
                          index, entry);
    if (offset == 0)
        return 0;
    if (entry & BME_ALL_ONES)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s' table entry %" PRIu64 " (0x%016"
                          PRIx64 ") has the all-ones flag and an offset",
                          it->name, index, entry);
    if (!is_aligned(offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s' table entry %" PRIu64 ": data offset "
                          "0x%" PRIx64 " is not cluster aligned", it->name,
                          index, offset);
    if (!range_inside(offset, img->cluster_size, file_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s' table entry %" PRIu64 ": data cluster "
                          "0x%" PRIx64 " is past the end of the file (0x%"
                          PRIx64 ")", it->name, index, offset, file_size);
    return 0;
}

/* The directory entry's fields against the format and the disk size. */
static int check_bitmap(qcow2_image *img, const qcow2_bitmap_info *bm,
                        qcow2_bitmap_iter *it, uint64_t file_size)
{
    uint64_t bits, bytes, expected, table_bytes;

    if (bm->type != BME_TYPE_DIRTY)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "bitmap '%s': type %u is not a dirty bitmap",
                          bm->name, bm->type);
    if (bm->flags & ~(uint32_t)BME_KNOWN_FLAGS)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s': reserved flags 0x%" PRIx32 " set",
                          bm->name, bm->flags & ~(uint32_t)BME_KNOWN_FLAGS);
    if (bm->flags & QCOW2_BITMAP_IN_USE)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "bitmap '%s' is in use (not stored cleanly): its "
                          "dirty bits are inconsistent", bm->name);
    bits = div_round_up(it->disk_size, bm->granularity);
    bytes = div_round_up(bits, 8);
    expected = div_round_up(bytes, img->cluster_size);
    if (bm->table_size != expected || bm->table_size > BME_MAX_TABLE_SIZE)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s': table size %" PRIu32 " does not "
                          "match the disk (%" PRIu64 " entries expected)",
                          bm->name, bm->table_size, expected);
    table_bytes = (uint64_t)bm->table_size * 8;
    if (bm->table_offset == 0 ||
        !is_aligned(bm->table_offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s': table offset 0x%" PRIx64 " is not "
                          "cluster aligned", bm->name, bm->table_offset);
    if (!range_inside(bm->table_offset, table_bytes, file_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap '%s': table at 0x%" PRIx64 " (%" PRIu64
                          " bytes) is past the end of the file (0x%" PRIx64
                          ")", bm->name, bm->table_offset, table_bytes,
                          file_size);
    it->total_bits = bits;
    return 0;
}

static int find_bitmap(qcow2_image *img, const char *name,
                       qcow2_bitmap_iter *it, uint64_t file_size)
{
    qcow2_bitmap_info *list;
    size_t count;
    int rc = qcow2_bitmap_list(img, &list, &count);

    if (rc < 0)
        return rc;
    rc = qcow2_fail(img, QCOW2_E_NOTFOUND, "no persistent bitmap named '%s'",
                    name);
    for (size_t i = 0; i < count; i++) {
        if (strcmp(list[i].name, name) != 0)
            continue;
        it->name = strdup(name);
        it->table_offset = list[i].table_offset;
        it->table_size = list[i].table_size;
        it->granularity_bits = list[i].granularity_bits;
        rc = it->name ? check_bitmap(img, &list[i], it, file_size)
                      : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        break;
    }
    qcow2_bitmap_list_free(list, count);
    return rc;
}

int qcow2_bitmap_extents_open(qcow2_image *img, const char *name,
                              qcow2_bitmap_iter **out)
{
    qcow2_bitmap_iter *it;
    uint64_t file_size, entry;
    int rc;

    *out = NULL;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_NOTFOUND, "no persistent bitmap "
                          "named '%s' (a raw image has none)", name);
    rc = img->io->ops->size(img->io, &file_size);
    if (rc < 0)
        return qcow2_fail(img, rc, "cannot get the file size");
    it = calloc(1, sizeof *it);
    if (!it)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    it->disk_size = img->hdr.size;      /* bitmaps track the active disk */
    it->bits_per_cluster = img->cluster_size * 8;
    rc = find_bitmap(img, name, it, file_size);
    for (uint64_t i = 0; rc == 0 && i < it->table_size; i++) {
        rc = table_entry(img, it, i, &entry);
        if (rc == 0)
            rc = check_entry(img, it, i, entry, file_size);
    }
    if (rc == 0) {
        it->data = malloc(img->cluster_size);
        if (!it->data)
            rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    if (rc < 0) {
        qcow2_bitmap_extents_free(it);
        return rc;
    }
    *out = it;
    return 0;
}

/* The first bit at or after `from` (< total_bits) whose value is `want`;
 * total_bits when there is none. Whole clusters of one value are skipped
 * from the table; data clusters byte by byte where bytes are uniform. */
static int next_bit(qcow2_image *img, qcow2_bitmap_iter *it, uint64_t from,
                    int want, uint64_t *found)
{
    uint64_t bit = from;

    while (bit < it->total_bits) {
        uint64_t index = bit / it->bits_per_cluster;
        uint64_t cluster_end = min_u64((index + 1) * it->bits_per_cluster,
                                       it->total_bits);
        uint64_t entry, offset;
        int rc = table_entry(img, it, index, &entry);

        if (rc < 0)
            return rc;
        offset = entry & BME_OFFSET_MASK;
        if (offset == 0) {
            if ((int)(entry & BME_ALL_ONES) == want) {
                *found = bit;
                return 0;
            }
            bit = cluster_end;
            continue;
        }
        if (!it->data_loaded || it->data_index != index) {
            it->data_loaded = 0;
            rc = qcow2_read_meta(img, offset, it->data, img->cluster_size,
                                 "bitmap data");
            if (rc < 0)
                return rc;
            it->data_loaded = 1;
            it->data_index = index;
        }
        while (bit < cluster_end) {
            uint64_t in = bit - index * it->bits_per_cluster;
            uint8_t byte = it->data[in / 8];
            uint8_t skip = want ? 0x00 : 0xff;

            if (in % 8 == 0 && byte == skip) {
                bit += 8;
                continue;
            }
            if (((byte >> (in % 8)) & 1) == want) {
                *found = bit;
                return 0;
            }
            bit++;
        }
        bit = cluster_end;
    }
    *found = it->total_bits;
    return 0;
}

int qcow2_bitmap_extents_next(qcow2_image *img, qcow2_bitmap_iter *it,
                              uint64_t *start, uint64_t *length)
{
    uint64_t first, end;
    int rc;

    rc = next_bit(img, it, it->pos, 1, &first);
    if (rc < 0)
        return rc;
    if (first >= it->total_bits) {
        it->pos = it->total_bits;
        return 0;
    }
    rc = next_bit(img, it, first + 1, 0, &end);
    if (rc < 0)
        return rc;
    it->pos = end;
    *start = first << it->granularity_bits;
    /* the last bit may cover less than a granule */
    *length = min_u64(end << it->granularity_bits, it->disk_size) - *start;
    return 1;
}
