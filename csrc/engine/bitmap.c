/*
 * Persistent dirty bitmaps, read side: the bitmap directory (format doc
 * section 8), for qemu-img info's "bitmaps" list and for inspection.
 * The directory is trusted only when the image says so (autoclear bit 0);
 * header.c has already bounded it (<= 1024 * 65535 bytes, inside the file,
 * cluster aligned).
 */
#include <stdlib.h>
#include <string.h>

#include "format.h"

#define BITMAP_ENTRY_FIXED      24u     /* bytes before extra data + name */
#define BITMAP_MAX_NAME         1023u
#define BITMAP_MAX_EXTRA        1024u   /* bounded by us: QEMU wants 0 */
#define BITMAP_MIN_GRANULARITY  9u
#define BITMAP_MAX_GRANULARITY  31u

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

void qcow2_bitmap_list_free(qcow2_bitmap_info *list, size_t count)
{
    if (!list)
        return;
    for (size_t i = 0; i < count; i++)
        free(list[i].name);
    free(list);
}

/* One directory entry at dir[pos]; *next gets the next entry's position
 * (entries are 8-byte aligned). */
static int parse_entry(qcow2_image *img, const uint8_t *dir, uint64_t size,
                       uint64_t pos, qcow2_bitmap_info *out, uint64_t *next)
{
    const uint8_t *e = dir + pos;
    uint32_t name_size, extra_size;
    uint64_t entry_bytes;

    if (!range_inside(pos, BITMAP_ENTRY_FIXED, size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap directory entry at +%llu runs past the "
                          "directory (%llu bytes)", ull(pos), ull(size));
    name_size = be16(e + 18);
    extra_size = be32(e + 20);
    if (name_size == 0 || name_size > BITMAP_MAX_NAME)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap directory entry at +%llu: name size %u "
                          "out of range (1..%u)", ull(pos), name_size,
                          BITMAP_MAX_NAME);
    if (extra_size > BITMAP_MAX_EXTRA)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap directory entry at +%llu: extra data size "
                          "%u too large", ull(pos), extra_size);
    entry_bytes = BITMAP_ENTRY_FIXED + (uint64_t)extra_size + name_size;
    if (!range_inside(pos, entry_bytes, size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap directory entry at +%llu runs past the "
                          "directory (%llu bytes)", ull(pos), ull(size));
    out->table_offset = be64(e);
    out->table_size = be32(e + 8);
    out->flags = be32(e + 12);
    out->type = e[16];
    out->granularity_bits = e[17];
    if (out->granularity_bits < BITMAP_MIN_GRANULARITY ||
        out->granularity_bits > BITMAP_MAX_GRANULARITY)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "bitmap directory entry at +%llu: granularity bits "
                          "%u out of range (%u..%u)", ull(pos),
                          out->granularity_bits, BITMAP_MIN_GRANULARITY,
                          BITMAP_MAX_GRANULARITY);
    out->granularity = 1ull << out->granularity_bits;
    out->name = malloc(name_size + 1u);
    if (!out->name)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    memcpy(out->name, e + BITMAP_ENTRY_FIXED + extra_size, name_size);
    out->name[name_size] = '\0';
    *next = pos + align_up(entry_bytes, 8);
    return 0;
}

int qcow2_bitmap_list(qcow2_image *img, qcow2_bitmap_info **out,
                      size_t *count)
{
    const qcow2_ext_info *ext = &img->ext;
    qcow2_bitmap_info *list;
    uint8_t *dir;
    uint64_t pos = 0;
    size_t n = 0;
    int ret = 0;

    *out = NULL;
    *count = 0;
    if (img->is_raw || !ext->has_bitmaps || ext->nb_bitmaps == 0)
        return 0;
    dir = malloc(ext->bitmap_directory_size ? ext->bitmap_directory_size : 1);
    list = calloc(ext->nb_bitmaps, sizeof *list);
    if (!dir || !list) {
        free(dir);
        free(list);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    ret = qcow2_read_meta(img, ext->bitmap_directory_offset, dir,
                          ext->bitmap_directory_size, "bitmap directory");
    for (; ret == 0 && n < ext->nb_bitmaps; n++)
        ret = parse_entry(img, dir, ext->bitmap_directory_size, pos,
                          &list[n], &pos);
    free(dir);
    if (ret < 0) {
        qcow2_bitmap_list_free(list, ext->nb_bitmaps);  /* calloc: unused names are NULL */
        return ret;
    }
    *out = list;
    *count = n;
    return 0;
}
