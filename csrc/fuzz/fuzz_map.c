/* libFuzzer harness: the guest extent map of the first 4 GiB, its
 * extents checked to follow each other; then the raw L2 tables of the
 * first L1 entries. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qcow2_image *img = fuzz_open(data, size, 0, 0);
    uint64_t *l2;
    size_t count;

    if (!img)
        return 0;
    fuzz_map(img, FUZZ_MAP_CAP);
    l2 = malloc(qcow2_cluster_size(img));
    for (uint32_t i = 0; l2 && i < qcow2_l1_size(img) && i < 4; i++)
        (void)qcow2_l2_table(img, i, l2, &count);
    free(l2);
    qcow2_close(img);
    return 0;
}
