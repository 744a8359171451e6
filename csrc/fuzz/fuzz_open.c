/* libFuzzer harness: open the input read-only and read back everything
 * the open parsed (header, extensions, feature names, snapshots, bitmaps,
 * a few table entries and refcounts). */
#include "fuzz_common.h"

static void inspect(qcow2_image *img)
{
    uint64_t refcount, entry;
    qcow2_snapshot_info info;
    qcow2_bitmap_info *bitmaps = NULL;
    size_t count = 0;

    (void)qcow2_get_header(img);
    (void)qcow2_get_ext_info(img);
    (void)qcow2_backing_name(img);
    (void)qcow2_backing_format(img);
    for (size_t i = 0; i < qcow2_extension_count(img); i++)
        (void)qcow2_extension(img, i);
    for (size_t i = 0; i < qcow2_feature_name_count(img); i++)
        (void)qcow2_feature_name_at(img, i);
    for (int kind = 0; kind < 3; kind++) {
        for (int bit = 0; bit < 64; bit++)
            (void)qcow2_feature_bit_name(img, kind, bit);
    }
    for (uint32_t i = 0; i < qcow2_snapshot_count(img); i++)
        (void)qcow2_snapshot_get(img, i, &info);
    if (qcow2_bitmap_list(img, &bitmaps, &count) == 0)
        qcow2_bitmap_list_free(bitmaps, count);
    for (uint32_t i = 0; i < qcow2_l1_size(img) && i < 4; i++)
        (void)qcow2_l1_entry(img, i, &entry);
    for (uint64_t c = 0; c < 16; c++)
        (void)qcow2_refcount(img, c, &refcount);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qcow2_image *img = fuzz_open(data, size, 0, 0);

    if (img) {
        inspect(img);
        qcow2_close(img);
    }
    return 0;
}
