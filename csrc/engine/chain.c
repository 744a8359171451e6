/*
 * qcow2_rebase and qcow2_commit: the files of the chain opened, closed
 * and swapped around the work of rebase.c, commit.c and amend.c (layer
 * 8). Both leave the handle's chain as the header now says it is.
 */
#include <stdlib.h>
#include <string.h>

#include "open.h"

static int is_empty(const char *s)
{
    return s == NULL || *s == '\0';
}

static int check_target(qcow2_image *img, const char *what)
{
    int rc = qcow2_check_writable(img);

    if (rc < 0)
        return rc;
    if (img->is_raw || img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "%s needs a qcow2 "
                          "image", what);
    return 0;
}

/* The new backing file for a rebase, or NULL (none, or unsafe and not
 * openable: the chain is then left closed). */
static int open_new_backing(qcow2_image *img, const char *name,
                            const char *format, int unsafe,
                            qcow2_image **out)
{
    int rc;

    *out = NULL;
    if (is_empty(name))
        return 0;
    rc = qcow2_open_chain_file(img, name, NULL, format, 0, out);
    if (rc < 0 && unsafe) {
        img->err.code = 0;
        img->err.msg[0] = '\0';
        return 0;
    }
    return rc;
}

int qcow2_rebase(qcow2_image *img, const char *backing_file,
                 const char *backing_format, int unsafe)
{
    qcow2_image *nb = NULL;
    const char *format = backing_format;
    int rc = check_target(img, "rebase");

    if (rc < 0)
        return rc;
    if (is_empty(backing_file) && !is_empty(backing_format))
        return qcow2_fail(img, QCOW2_E_INVALID, "a backing format without "
                          "a backing file");
    if (!unsafe && img->backing_name && !img->backing)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "a safe rebase needs "
                          "the old backing chain open (open with backing "
                          "= true, or rebase unsafe)");
    if (!unsafe && !is_empty(backing_file) &&
        (strncmp(backing_file, "json:", 5) == 0 ||
         qcow2_has_protocol(backing_file)))
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "backing file '%s': "
                          "only plain file names are followed",
                          backing_file);
    rc = open_new_backing(img, backing_file, backing_format, unsafe, &nb);
    if (rc < 0)
        return rc;
    /* No format given: what the file is (safe), or none stored. */
    if (is_empty(format))
        format = nb && !unsafe ? qcow2_format(nb) : "";
    if (!unsafe)
        rc = qcow2_rebase_copy(img, nb);
    if (rc == 0)
        rc = qcow2_set_backing(img, is_empty(backing_file) ? ""
                                                         : backing_file,
                               is_empty(backing_file) ? "" : format);
    if (rc < 0) {
        qcow2_close(nb);
        return rc;
    }
    qcow2_close(img->backing);
    img->backing = nb;
    return 0;
}

int qcow2_commit(qcow2_image *img)
{
    qcow2_image *base = NULL, *again = NULL;
    char *path = NULL, *name = NULL, *format = NULL;
    qcow2_error saved;
    int rc = check_target(img, "commit"), rc2;

    if (rc < 0)
        return rc;
    if (!img->backing_name)
        return qcow2_fail(img, QCOW2_E_INVALID, "commit needs a backing "
                          "file");
    if (!img->backing)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "commit needs the "
                          "backing chain open (open with backing = true)");
    if ((rc = qcow2_flush(img)) < 0)
        return rc;
    path = strdup(img->backing->path);
    name = strdup(img->backing_name);
    format = strdup(qcow2_format(img->backing));
    if (!path || !name || !format) {
        rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        goto out;
    }
    /* The read-only handle's locks would refuse the writer's: it goes,
     * and the same file comes back read-write (QEMU reopens it too). */
    qcow2_close(img->backing);
    img->backing = NULL;
    rc = qcow2_open_chain_file(img, name, path, format, 1, &base);
    if (rc == 0) {
        img->backing = base;   /* reads of partial clusters see it */
        rc = qcow2_commit_copy(img, base);
        img->backing = NULL;
    }
    /* Everything is in the backing file, flushed: now empty the image. */
    if (rc == 0)
        rc = qcow2_make_empty(img);
    qcow2_close(base);
    saved = img->err;
    /* The chain as before, read-only; a failure here is the call's only
     * when the commit itself went well. */
    rc2 = qcow2_open_chain_file(img, name, path, format, 0, &again);
    if (rc2 == 0)
        img->backing = again;
    else if (rc == 0)
        rc = rc2;
    else
        img->err = saved;   /* the first failure is the one to tell */
out:
    free(path);
    free(name);
    free(format);
    return rc;
}
