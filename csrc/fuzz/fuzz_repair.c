/* libFuzzer harness: check -r all on a read-write memory copy opened for
 * repair, a second check of the result, reads and the closing flush. */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qcow2_image *img = fuzz_open(data, size, 1, 1);
    qcow2_check_result res;
    uint8_t buf[4096];

    if (!img)
        return 0;
    if (qcow2_check(img, QCOW2_REPAIR_ALL, &res) == 0) {
        qcow2_check_result_free(&res);
        if (qcow2_check(img, QCOW2_REPAIR_NONE, &res) == 0)
            qcow2_check_result_free(&res);
        fuzz_read_pattern(img, buf, sizeof buf);
    }
    (void)qcow2_flush(img);
    qcow2_close(img);
    return 0;
}
