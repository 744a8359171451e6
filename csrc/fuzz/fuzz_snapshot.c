/* libFuzzer harness: a read-only view of each snapshot (the first 8):
 * reads over the fixed pattern and the map of its first 1 GiB. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qcow2_image *img = fuzz_open(data, size, 0, 0);
    qcow2_image *view;
    uint8_t buf[4096];
    qcow2_snapshot_info info;

    if (!img)
        return 0;
    for (uint32_t i = 0; i < qcow2_snapshot_count(img) && i < FUZZ_MAX_VIEWS;
         i++) {
        (void)qcow2_snapshot_get(img, i, &info);
        if (qcow2_snapshot_open(img, i, &view) < 0)
            continue;
        fuzz_read_pattern(view, buf, sizeof buf);
        fuzz_map(view, 1ull << 30);
        qcow2_close(view);
    }
    qcow2_close(img);
    return 0;
}
