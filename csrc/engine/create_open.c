/*
 * qcow2_create (layer 9): the image laid out by create.c (layer 8), then
 * opened read-write like any other. Apart from image.c so that a
 * read-only consumer of open/close does not link the create path.
 */
#include "ops.h"

int qcow2_create(const char *path, const qcow2_create_opts *opts,
                 const qcow2_open_opts *open_opts, qcow2_image **out,
                 qcow2_error *err)
{
    qcow2_error scratch;
    qcow2_open_opts rw_opts;
    int rc;

    if (!err)
        err = &scratch;
    if (out)
        *out = NULL;
    rc = qcow2_create_layout(path, opts, err);
    if (rc < 0 || !out)
        return rc;

    if (open_opts)
        rw_opts = *open_opts;
    else
        qcow2_open_opts_init(&rw_opts);
    rw_opts.read_write = 1;
    rw_opts.force_share = 0;    /* a writer shares no writes */
    if (opts->encrypt.format && !rw_opts.key) {
        rw_opts.key = opts->encrypt.key;
        rw_opts.key_len = opts->encrypt.key_len;
    }
    return qcow2_open(path, &rw_opts, out, err);
}

