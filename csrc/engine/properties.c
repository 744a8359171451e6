/*
 * What a handle tells its callers (layer 3): path, format, sizes, version,
 * backing names and the active L1 entries, all read from fields the open
 * path filled in. Low on purpose: operations (resize, ...) ask these too.
 */
#include "internal.h"

const char *qcow2_path(const qcow2_image *img)
{
    return img->path;
}

const char *qcow2_format(const qcow2_image *img)
{
    return img->is_raw ? "raw" : "qcow2";
}

uint64_t qcow2_virtual_size(const qcow2_image *img)
{
    return img->size;
}

uint64_t qcow2_cluster_size(const qcow2_image *img)
{
    return img->is_raw ? 0 : img->cluster_size;
}

uint32_t qcow2_version(const qcow2_image *img)
{
    return img->is_raw ? 0 : img->hdr.version;
}

int qcow2_is_read_only(const qcow2_image *img)
{
    return img->read_only;
}

const char *qcow2_backing_name(const qcow2_image *img)
{
    return img->backing_name;
}

const char *qcow2_backing_format(const qcow2_image *img)
{
    return img->ext.backing_format;
}

qcow2_image *qcow2_backing(const qcow2_image *img)
{
    return img->backing;
}

/* One of the file's sizes through the io layer; a failure names `what`
 * and the errno text. */
static int io_size(qcow2_image *img, int (*op)(qcow2_io *, uint64_t *),
                   const char *what, uint64_t *out)
{
    char text[128];
    int ret = op(img->io, out);

    if (ret < 0)
        return qcow2_fail(img, ret, "cannot get the %s: %s", what,
                          qcow2_errno_text(img->io->last_errno, text,
                                           sizeof text));
    return 0;
}

int qcow2_file_size(qcow2_image *img, uint64_t *out)
{
    return io_size(img, img->io->ops->size, "file size", out);
}

int qcow2_allocated_file_size(qcow2_image *img, uint64_t *out)
{
    return io_size(img, img->io->ops->allocated, "allocated size", out);
}

uint32_t qcow2_l1_size(const qcow2_image *img)
{
    return img->l1_size;
}

int qcow2_l1_entry(qcow2_image *img, uint32_t l1_index, uint64_t *entry)
{
    *entry = 0;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_INVALID, "a raw image has no L1 table");
    if (l1_index >= img->l1_size)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "L1 index %u out of range (l1_size %u)", l1_index,
                          img->l1_size);
    *entry = img->l1[l1_index];
    return 0;
}
