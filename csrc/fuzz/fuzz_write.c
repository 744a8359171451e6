/* libFuzzer harness: a fixed write workload on a read-write memory copy
 * (a dirty image is repaired by the open first): writes across cluster
 * edges, zero writes with and without unmap, a discard, a compressed
 * cluster, a snapshot, copy-on-write over it, flush, then a check. */
#include "fuzz_common.h"

#define WL_BUF (3 * 65536)

/* One operation inside the disk only: the offsets scale with the cluster
 * size; an operation the disk is too small for is skipped. */
static void op_write(qcow2_image *img, uint64_t off, size_t len,
                     const uint8_t *buf)
{
    if (len && off < qcow2_virtual_size(img) &&
        len <= qcow2_virtual_size(img) - off)
        (void)qcow2_write(img, off, buf, len);
}

static void workload(qcow2_image *img, uint8_t *buf)
{
    uint64_t cs = qcow2_cluster_size(img);
    uint64_t size = qcow2_virtual_size(img);
    qcow2_check_result res;
    uint32_t index;

    if (cs == 0 || cs > 65536 * 32)
        return;
    for (size_t i = 0; i < WL_BUF; i++)
        buf[i] = (uint8_t)(i * 7 + 1);
    op_write(img, 0, (size_t)fuzz_min(2 * cs, WL_BUF), buf);
    op_write(img, cs - 100, 300, buf);
    op_write(img, 3 * cs + 17, (size_t)fuzz_min(cs, WL_BUF), buf);
    if (4 * cs + cs <= size) {
        (void)qcow2_write_zeroes(img, 4 * cs, cs, 0);
        (void)qcow2_write_zeroes(img, cs + 100, 300, 1);
        (void)qcow2_discard(img, 0, cs);
    }
    if (cs <= WL_BUF && 5 * cs + cs <= size)
        (void)qcow2_write_compressed(img, 5 * cs, buf, (size_t)cs);
    (void)qcow2_snapshot_create(img, "fuzz", NULL, &index);
    op_write(img, 512, 1024, buf + 5);
    op_write(img, size > 4096 ? size - 4096 : 0, 4096, buf);
    (void)qcow2_flush(img);
    if (qcow2_check(img, QCOW2_REPAIR_NONE, &res) == 0)
        qcow2_check_result_free(&res);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    qcow2_image *img = fuzz_open(data, size, 1, 0);
    uint8_t *buf;

    if (!img)
        return 0;
    buf = malloc(WL_BUF);
    if (buf)
        workload(img, buf);
    free(buf);
    qcow2_close(img);
    return 0;
}
