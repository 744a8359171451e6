/* libFuzzer harness: guest reads over a fixed pattern (the first 8 MiB in
 * unaligned chunks, spots near the middle and the end). */
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qcow2_image *img = fuzz_open(data, size, 0, 0);
    uint8_t *buf;

    if (!img)
        return 0;
    buf = malloc(FUZZ_CHUNK);
    if (buf)
        fuzz_read_pattern(img, buf, FUZZ_CHUNK);
    free(buf);
    qcow2_close(img);
    return 0;
}
