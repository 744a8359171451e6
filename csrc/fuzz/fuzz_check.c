/* libFuzzer harness: qemu-img check (no repair) on a read-only open. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qcow2_image *img = fuzz_open(data, size, 0, 0);
    qcow2_check_result res;

    if (!img)
        return 0;
    if (qcow2_check(img, QCOW2_REPAIR_NONE, &res) == 0)
        qcow2_check_result_free(&res);
    qcow2_close(img);
    return 0;
}
