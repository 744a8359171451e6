/*
 * Metadata I/O: bounded reads of the image file (metadata) and of the
 * data file (guest data), and the L1 table load. Every length here comes
 * from the caller, which validated it against the file and QEMU's limits.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "meta_io.h"

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

int qcow2_pread_zero_fill(qcow2_io *io, uint64_t offset, void *buf,
                          size_t len, size_t *done)
{
    uint8_t *bytes = buf;
    size_t got = 0;

    while (got < len) {
        int64_t n = io->ops->pread(io, bytes + got, len - got, offset + got);
        if (n < 0) {
            *done = got;
            return (int)n;
        }
        if (n == 0)
            break;              /* end of file */
        got += (size_t)n;
    }
    memset(bytes + got, 0, len - got);
    *done = got;
    return 0;
}

static int read_meta(qcow2_image *img, uint64_t offset, void *buf,
                     size_t len, const char *what, int zero_fill)
{
    char text[128];
    size_t n;
    int ret;

    if (len == 0)
        return 0;
    if (!range_inside(offset, len, UINT64_MAX))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s at 0x%llx (%zu bytes) lies past any file",
                          what, ull(offset), len);
    ret = qcow2_pread_zero_fill(img->io, offset, buf, len, &n);
    if (ret < 0)
        return qcow2_fail(img, ret, "cannot read %s at 0x%llx: %s", what,
                          ull(offset),
                          qcow2_errno_text(img->io->last_errno, text,
                                           sizeof text));
    /* An open for repair keeps the zeroes: qemu-img check -r works on
     * what QEMU's block layer reads past the end of the file. */
    if (n < len && !zero_fill)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s at 0x%llx (%zu bytes) runs past the end of the "
                          "file", what, ull(offset), len);
    return 0;
}

int qcow2_read_meta(qcow2_image *img, uint64_t offset, void *buf,
                    size_t len, const char *what)
{
    return read_meta(img, offset, buf, len, what, img->open_for_repair);
}

int qcow2_read_meta_lenient(qcow2_image *img, uint64_t offset, void *buf,
                            size_t len, const char *what)
{
    return read_meta(img, offset, buf, len, what, qcow2_open_is_lenient(img));
}

int qcow2_read_host_data(qcow2_image *img, uint64_t offset, void *buf,
                         size_t len)
{
    qcow2_io *io = img->data_io ? img->data_io : img->io;
    char text[128];
    size_t n;
    int ret;

    if (len == 0)
        return 0;
    /* QEMU does not pad the file's last cluster: the rest reads as 0. */
    ret = qcow2_pread_zero_fill(io, offset, buf, len, &n);
    if (ret < 0)
        return qcow2_fail(img, ret,
                          "cannot read guest data at host offset 0x%llx: %s",
                          ull(offset),
                          qcow2_errno_text(io->last_errno, text, sizeof text));
    return 0;
}

int qcow2_l1_load(qcow2_image *img, uint64_t offset, uint32_t count,
                  const char *what, uint64_t **out)
{
    uint64_t *l1;
    int ret;

    *out = NULL;
    if (count == 0)
        return 0;
    if (count > QCOW2_MAX_L1_BYTES / 8)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "%s of %u entries too large", what, count);
    l1 = malloc((size_t)count * 8);
    if (!l1)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for the %s",
                          what);
    ret = qcow2_read_meta(img, offset, l1, (size_t)count * 8, what);
    if (ret < 0) {
        free(l1);
        return ret;
    }
    /* in place: each entry is read before it is overwritten */
    for (uint32_t i = 0; i < count; i++)
        l1[i] = be64(&l1[i]);
    *out = l1;
    return 0;
}
