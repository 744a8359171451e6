/*
 * Opening and closing images: the file, the header and tables, the
 * external data file and the backing chain (the metadata reads are
 * meta_io.c's, the handle's properties properties.c's).
 *
 * A read-only open never writes a byte, to the image or to anything in its
 * chain: dirty, corrupt-flagged and unknown-autoclear images open as they
 * are (QEMU too leaves them alone without write access).
 *
 * Every file of the chain is locked as QEMU 7.2 locks it (lock.c), once its
 * format is known and before anything else is read from it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io_fault.h"
#include "crypto.h"
#include "lock.h"
#include "open.h"

#define RESOLVED_PATH_MAX   4096
#define RESOLVE_WHY_MAX     256
#define MEMORY_IMAGE_NAME   "<memory>"   /* path of qcow2_open_memory's */

/* How the file at a path is to be read. */
enum image_format {
    FORMAT_PROBE,       /* qcow2 magic -> qcow2, anything else -> raw */
    FORMAT_QCOW2,       /* must be qcow2 */
    FORMAT_RAW,         /* raw whatever it holds (backing format "raw") */
};

/* (dev, ino) of every file opened so far in one chain: loop detection. */
typedef struct file_chain {
    int count;
    uint64_t dev[QCOW2_MAX_CHAIN_DEPTH + 1];
    uint64_t ino[QCOW2_MAX_CHAIN_DEPTH + 1];
} file_chain;

static int open_image(const char *path, const qcow2_open_opts *opts,
                      int depth, file_chain *chain, int format,
                      qcow2_io *memory, qcow2_io *power,
                      qcow2_image **out, qcow2_error *err);

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

/* ---- Names and paths ------------------------------------------------------ */

static char *folder_of(const char *path)
{
    const char *slash = strrchr(path, '/');

    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

static char *join_path(const char *dir, const char *name)
{
    size_t dir_length, name_length;
    char *joined;

    if (name[0] == '/' || strcmp(dir, ".") == 0)
        return strdup(name);
    dir_length = strlen(dir);
    name_length = strlen(name);
    joined = malloc(dir_length + 1 + name_length + 1);
    if (joined) {
        memcpy(joined, dir, dir_length);
        joined[dir_length] = '/';
        memcpy(joined + dir_length + 1, name, name_length + 1);
    }
    return joined;
}

/* QEMU's path_has_protocol: a ':' before any '/' ("nbd://", "file:x"). */
int qcow2_has_protocol(const char *name)
{
    return name[strcspn(name, ":/")] == ':';
}

/* A file name from the image, followed only as a plain file next to the
 * image (or absolute): json: and protocol names could reach anything. */
static int resolve_plain_name(qcow2_image *img, const char *what,
                              const char *name, char **path)
{
    *path = NULL;
    if (strncmp(name, "json:", 5) == 0)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "%s '%s': json: names are not followed", what,
                          name);
    if (qcow2_has_protocol(name))
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "%s '%s': protocol names are not followed", what,
                          name);
    *path = join_path(img->dir, name);
    if (!*path)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for a path");
    return 0;
}

static int is_status(int code)
{
    return code <= QCOW2_E_IO && code >= QCOW2_E_BUSY;
}

/* The caller's resolver decides where the backing file is, or refuses. */
static int resolve_with_callback(qcow2_image *img, const qcow2_open_opts *opts,
                                 const char *name, char **path)
{
    char resolved[RESOLVED_PATH_MAX] = "";
    char why[RESOLVE_WHY_MAX] = "";
    int ret;

    *path = NULL;
    ret = opts->resolve(opts->resolve_ctx, name, img->ext.backing_format,
                        img->depth, resolved, sizeof resolved, why,
                        sizeof why);
    resolved[sizeof resolved - 1] = '\0';
    why[sizeof why - 1] = '\0';
    if (ret < 0)
        return qcow2_fail(img, is_status(ret) ? ret : QCOW2_E_UNSUPPORTED,
                          "backing file '%s': %s", name,
                          why[0] ? why : "refused by the resolver");
    if (resolved[0] == '\0')
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "backing file '%s': the resolver gave no path",
                          name);
    *path = strdup(resolved);
    if (!*path)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for a path");
    return 0;
}

/* ---- Open steps ------------------------------------------------------------ */

static qcow2_image *new_image(const char *path)
{
    qcow2_image *img = calloc(1, sizeof *img);

    if (!img)
        return NULL;
    img->path = strdup(path);
    img->dir = folder_of(path);
    if (!img->path || !img->dir) {
        free(img->path);
        free(img->dir);
        free(img);
        return NULL;
    }
    img->read_only = 1;
    img->owns_io = 1;
    img->owns_backing = 1;
    return img;
}

/* The file itself, refusing one already open lower in this chain. */
static int open_file(qcow2_image *img, file_chain *chain)
{
    char text[128];
    int sys_errno = 0, ret;
    qcow2_io *io = img->io;

    ret = qcow2_io_open_file(img->path, !img->read_only, &img->io,
                             &sys_errno);
    if (ret < 0)
        return qcow2_fail(img, ret, "%s",
                          qcow2_errno_text(sys_errno, text, sizeof text));
    io = img->io;
    for (int i = 0; i < chain->count; i++) {
        if (chain->dev[i] == io->dev && chain->ino[i] == io->ino &&
            (io->dev || io->ino))
            return qcow2_fail(img, QCOW2_E_CORRUPT,
                              "backing chain loop: '%s' is already in the "
                              "chain", img->path);
    }
    if (chain->count < (int)(sizeof chain->dev / sizeof chain->dev[0])) {
        chain->dev[chain->count] = io->dev;
        chain->ino[chain->count] = io->ino;
        chain->count++;
    }
    ret = io->ops->size(io, &img->file_size);
    if (ret < 0)
        return qcow2_fail(img, ret, "cannot get the file size: %s",
                          qcow2_errno_text(io->last_errno, text, sizeof text));
    return 0;
}

/* The caller's bytes as the image file (qcow2_open_memory): the handle
 * owns io from here on, and follows no file names from the image. */
static int adopt_memory(qcow2_image *img, qcow2_io *io)
{
    img->io = io;
    img->in_memory = 1;
    return io->ops->size(io, &img->file_size);
}

/* Does the file start with the qcow2 magic? */
static int has_qcow2_magic(qcow2_image *img, int *is_qcow2)
{
    uint8_t magic[4];
    int ret;

    *is_qcow2 = 0;
    if (img->file_size < sizeof magic)
        return 0;
    ret = qcow2_read_meta(img, 0, magic, sizeof magic, "header");
    if (ret < 0)
        return ret;
    *is_qcow2 = be32(magic) == QCOW2_MAGIC;
    return 0;
}

/* A raw image: the file is the disk, as QEMU's raw probe takes it. */
static void set_raw(qcow2_image *img)
{
    img->is_raw = 1;
    /* QEMU counts a raw disk in whole 512-byte sectors; the tail past the
     * file reads as zeroes. File sizes come from fstat, far below 2^63. */
    img->size = align_up(img->file_size, 512);
    img->data_io = img->io;
    img->owns_data_io = 0;
}

/* Take QEMU's locks for `role` on one file of the image; "busy" names
 * the other holder. */
static int lock_file(qcow2_image *img, qcow2_io *io, int role)
{
    qcow2_lock_conflict conflict;
    char why[QCOW2_ERRMSG_MAX];
    int ret = qcow2_io_lock(io, role, &conflict);

    if (ret == 0)
        return 0;
    qcow2_lock_describe(&conflict, img->read_only, why, sizeof why);
    return qcow2_fail(img, ret, "%s", why);
}

/* The image file's locks, once its format is known: QEMU's qcow2 driver
 * does not share writes or resizes; a raw image shares everything, as
 * qemu-io's raw images do; force_share (-U) only reads and shares all. */
static int lock_image(qcow2_image *img, int is_raw)
{
    int role;

    if (img->force_share)
        role = LOCK_SHARED;
    else if (is_raw)
        role = img->read_only ? LOCK_SHARED : LOCK_RAW_RW;
    else
        role = img->read_only ? LOCK_QCOW2_RO : LOCK_QCOW2_RW;
    return lock_file(img, img->io, role);
}

/* Guest data in a separate file (incompatible bit 2): named by the
 * extension, followed under the backing-file policy, opened read-only. */
static int open_data_file(qcow2_image *img, const char *given)
{
    char text[128];
    char *path;
    int sys_errno = 0, ret;

    img->data_io = img->io;
    img->owns_data_io = 0;
    if (!(img->hdr.incompatible_features & INCOMPAT_DATA_FILE)) {
        if (given)
            return qcow2_fail(img, QCOW2_E_INVALID, "data_file can only "
                              "be given for images with an external data "
                              "file");
        return 0;
    }
    if (!img->data_file_ext && !given)
        return qcow2_fail(img, QCOW2_E_NOTFOUND,
                          "data-file is required for this image");
    if (img->in_memory)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "data file '%s': not "
                          "followed from a memory image", img->data_file_ext);
    /* opts.data_file (the caller's path, used as given) wins over the
     * name in the image, which is followed as a backing name is. */
    if (given) {
        path = strdup(given);
        if (!path)
            return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for a path");
    } else {
        ret = resolve_plain_name(img, "data file", img->data_file_ext,
                                 &path);
        if (ret < 0)
            return ret;
        given = img->data_file_ext;
    }
    ret = qcow2_io_open_file(path, !img->read_only, &img->data_io,
                             &sys_errno);
    free(path);
    if (ret < 0) {
        img->data_io = img->io;
        return qcow2_fail(img, ret, "data file '%s': %s", given,
                          qcow2_errno_text(sys_errno, text, sizeof text));
    }
    img->owns_data_io = 1;
    return lock_file(img, img->data_io,
                     img->force_share ? LOCK_SHARED
                     : img->read_only ? LOCK_DATA_FILE_RO
                                      : LOCK_DATA_FILE_RW);
}

static int create_l2_cache(qcow2_image *img, const qcow2_open_opts *opts)
{
    uint64_t bytes = opts->l2_cache_size ? opts->l2_cache_size
                                         : qcow2_default_l2_cache_bytes(img);
    int ret = qcow2_l2_cache_new(img, bytes, &img->l2_cache);

    if (ret < 0)
        return img->err.code ? ret
                             : qcow2_fail(img, ret, "cannot create the L2 "
                                          "cache of %llu bytes", ull(bytes));
    img->l2_cache_bytes = bytes;
    return 0;
}

static int load_qcow2(qcow2_image *img, const qcow2_open_opts *opts)
{
    int ret;

    /* known before the header is validated: a repair-mode open is as
     * permissive as QEMU's (header.c) */
    img->open_for_repair = opts->read_write && opts->repair;
    if ((ret = qcow2_header_load(img)) < 0)
        return ret;
    ret = qcow2_l1_load(img, img->hdr.l1_table_offset, img->hdr.l1_size,
                        "L1 table", &img->l1);
    if (ret < 0)
        return ret;
    img->l1_size = img->hdr.l1_size;
    if ((ret = qcow2_reftable_load(img)) < 0 ||
        (ret = qcow2_snapshots_load(img)) < 0 ||
        (ret = open_data_file(img, img->depth == 0 ? opts->data_file
                                                   : NULL)) < 0)
        return ret;
    /* Keys before anything reads guest data (a dirty repair does not). */
    img->owns_crypto = 1;
    if ((ret = qcow2_crypto_open(img, opts->key, opts->key_len)) < 0)
        return ret;
    if ((ret = create_l2_cache(img, opts)) < 0)
        return ret;
    /* The refcount-block cache is created on first use (refcount_cache.c). */
    img->refcount_cache_bytes = opts->refcount_cache_size;
    /* Read-write (write_state.c): options, autoclear bits, bitmaps in
     * use; read-only leaves the file as it is. */
    return img->read_only ? 0 : qcow2_write_state_init(img, opts);
}

/* ---- Dirty images ------------------------------------------------------------ */

/*
 * What a crashed writer with lazy refcounts leaves: refcounts lower than
 * the references. As QEMU does on a read-write open of a dirty image, the
 * full check with repair of everything runs (check.c, repair.c), as the
 * last step of the open, on a whole handle; it clears the dirty bit when
 * it leaves no corruption. Only a check that could not complete fails the
 * open. Read-only opens and opens for repair leave the image as it is.
 */
static int needs_dirty_repair(const qcow2_image *img,
                              const qcow2_open_opts *opts)
{
    return !img->read_only && !img->is_raw && !opts->repair &&
           (img->hdr.incompatible_features & INCOMPAT_DIRTY);
}

/* The message a failed call left, without its "<path>: " prefix (the
 * wrapping message adds it again). */
static const char *inner_message(const qcow2_image *img)
{
    size_t n = img->path ? strlen(img->path) : 0;

    if (n && strncmp(img->err.msg, img->path, n) == 0 &&
        strncmp(img->err.msg + n, ": ", 2) == 0)
        return img->err.msg + n + 2;
    return img->err.msg;
}

static int repair_dirty(qcow2_image *img)
{
    qcow2_check_result res;
    int rc = qcow2_check(img, QCOW2_REPAIR_ALL, &res);

    if (rc < 0)
        return qcow2_fail(img, rc, "cannot repair the dirty image: %s",
                          inner_message(img));
    if (res.check_errors)
        rc = qcow2_fail(img, QCOW2_E_IO, "Could not repair dirty image: "
                        "%llu errors during the check",
                        (unsigned long long)res.check_errors);
    if (!(img->hdr.incompatible_features & INCOMPAT_DIRTY))
        img->ws->dirty_on_disk = 0;
    qcow2_check_result_free(&res);
    return rc;
}

/* Read-write opens only: the test fault plan wraps the image file. */
static int wrap_faults(qcow2_image *img, const qcow2_open_opts *opts,
                       qcow2_io *power)
{
    qcow2_fault_plan plan;
    int ret;

    /* a file opened for writing by an operation of a handle under a plan
     * (commit's backing file) shares that plan and its write count */
    if (power && qcow2_io_is_fault(power)) {
        ret = qcow2_io_wrap_faults_linked(img->io, power, &img->io);
        return ret < 0 ? qcow2_fail(img, ret, "out of memory") : 0;
    }
    if (opts->fail_after_writes < 0 && opts->stop_after_writes < 0 &&
        !opts->trace_writes)
        return 0;
    if (opts->volatile_cache && opts->stop_after_writes < 0)
        return qcow2_fail(img, QCOW2_E_INVALID, "a volatile cache needs "
                          "stop_after_writes");
    qcow2_fault_plan_init(&plan);
    plan.fail_after_writes = opts->fail_after_writes;
    plan.fail_status = opts->fail_status;
    plan.stop_after_writes = opts->stop_after_writes;
    plan.volatile_cache = opts->volatile_cache;
    plan.seed = opts->volatile_seed;
    plan.trace = opts->trace_writes;
    ret = qcow2_io_wrap_faults(img->io, &plan, &img->io);
    return ret < 0 ? qcow2_fail(img, ret, "out of memory") : 0;
}

/* "<path>: reason" of a failed child, without its path (the parent's
 * message names the backing file already). */
static const char *without_path(const qcow2_error *err, const char *path)
{
    size_t length = strlen(path);

    if (strncmp(err->msg, path, length) == 0 &&
        strncmp(err->msg + length, ": ", 2) == 0)
        return err->msg + length + 2;
    return err->msg;
}

static int backing_format_of(qcow2_image *img, int *format)
{
    const char *name = img->ext.backing_format;

    *format = FORMAT_PROBE;
    if (!name)
        return 0;
    if (strcmp(name, "qcow2") == 0)
        *format = FORMAT_QCOW2;
    else if (strcmp(name, "raw") == 0)
        *format = FORMAT_RAW;
    else
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "backing file '%s': format '%s' is not supported",
                          img->backing_name, name);
    return 0;
}

static int open_backing(qcow2_image *img, const qcow2_open_opts *opts,
                        file_chain *chain)
{
    qcow2_open_opts child_opts = *opts;
    qcow2_error child_err = { 0, "" };
    char *path = NULL;
    int format, ret;

    if (!img->backing_name || opts->no_backing)
        return 0;
    if (img->depth >= QCOW2_MAX_CHAIN_DEPTH)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "backing file '%s': chain deeper than %d backing "
                          "files", img->backing_name, QCOW2_MAX_CHAIN_DEPTH);
    if ((ret = backing_format_of(img, &format)) < 0)
        return ret;
    ret = opts->resolve
              ? resolve_with_callback(img, opts, img->backing_name, &path)
              : resolve_plain_name(img, "backing file", img->backing_name,
                                   &path);
    if (ret < 0)
        return ret;
    /* Backing files are only ever read. */
    child_opts.read_write = 0;
    child_opts.allow_raw = 1;
    child_opts.data_file = NULL;    /* names the top image's data file */
    ret = open_image(path, &child_opts, img->depth + 1, chain, format,
                     NULL, NULL, &img->backing, &child_err);
    /* Only the top names the chain link it followed; deeper levels pass
     * the failing file's own message up unchanged, so a long chain cannot
     * push the root cause out of the one-line message. */
    if (ret < 0 && img->depth > 0)
        img->err = child_err;
    else if (ret < 0)
        qcow2_fail(img, ret, "backing file '%s': %s", img->backing_name,
                   without_path(&child_err, path));
    free(path);
    return ret;
}

static int open_image(const char *path, const qcow2_open_opts *opts,
                      int depth, file_chain *chain, int format,
                      qcow2_io *memory, qcow2_io *power,
                      qcow2_image **out, qcow2_error *err)
{
    qcow2_image *img = new_image(path);
    int is_qcow2 = 0, is_raw, ret;

    *out = NULL;
    if (!img) {
        qcow2_io_close(memory);
        return qcow2_error_set(err, QCOW2_E_NOMEM, "%s: out of memory",
                               path);
    }
    img->depth = depth;
    img->read_only = !opts->read_write;   /* backing files get 0 */
    img->force_share = opts->force_share;
    if (opts->force_share && opts->read_write)
        ret = qcow2_fail(img, QCOW2_E_INVALID, "force_share can only be "
                         "used with read-only opens");
    else if (memory)
        ret = adopt_memory(img, memory);
    else
        ret = open_file(img, chain);
    if (ret == 0 && format == FORMAT_PROBE)
        ret = has_qcow2_magic(img, &is_qcow2);
    is_raw = format == FORMAT_RAW || (format == FORMAT_PROBE && !is_qcow2);
    /* Locks on the file's own fd, before the fault plan wraps it. */
    if (ret == 0)
        ret = lock_image(img, is_raw);
    if (ret == 0 && !img->read_only)
        ret = wrap_faults(img, opts, power);
    if (ret == 0) {
        if (is_raw) {
            set_raw(img);
            if (!img->read_only)
                ret = qcow2_write_state_init(img, opts);
        } else if ((ret = load_qcow2(img, opts)) == 0) {
            ret = open_backing(img, opts, chain);
        }
    }
    /* Last: the handle is whole (chain, caches, snapshots, write state). */
    if (ret == 0 && needs_dirty_repair(img, opts))
        ret = repair_dirty(img);
    if (ret < 0) {
        *err = img->err;
        qcow2_close(img);
        return ret;
    }
    img->err.code = 0;
    img->err.msg[0] = '\0';
    *out = img;
    return 0;
}

int qcow2_open(const char *path, const qcow2_open_opts *opts,
               qcow2_image **out, qcow2_error *err)
{
    qcow2_open_opts defaults;
    qcow2_error scratch;
    file_chain chain = { 0, { 0 }, { 0 } };

    if (!err)
        err = &scratch;
    err->code = 0;
    err->msg[0] = '\0';
    *out = NULL;
    if (!opts) {
        qcow2_open_opts_init(&defaults);
        opts = &defaults;
    }
    if (!path)
        return qcow2_error_set(err, QCOW2_E_INVALID, "no path given");
    return open_image(path, opts, 0, &chain,
                      opts->allow_raw ? FORMAT_PROBE : FORMAT_QCOW2, NULL,
                      NULL, out, err);
}

/*
 * A file to become img's backing file (rebase's new backing, commit's
 * backing reopened): `name` as stored in the header, followed under the
 * plain-name policy (next to img, or absolute; never json: or protocols),
 * or `path` as given (NULL: from name). Opened at img's depth + 1 with
 * its own chain (plain names; a resolver given at img's open is gone),
 * read-only or, for commit, read-write with the writer's locks and under
 * img's fault plan (one write count for both files). format NULL probes.
 */
int qcow2_open_chain_file(qcow2_image *img, const char *name,
                          const char *path, const char *format,
                          int read_write, qcow2_image **out)
{
    qcow2_open_opts opts;
    qcow2_error err = { 0, "" };
    file_chain chain = { 0, { 0 }, { 0 } };
    char *resolved = NULL;
    int kind = FORMAT_PROBE, ret;

    *out = NULL;
    if (format && strcmp(format, "qcow2") == 0)
        kind = FORMAT_QCOW2;
    else if (format && strcmp(format, "raw") == 0)
        kind = FORMAT_RAW;
    else if (format)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "backing file '%s': "
                          "format '%s' is not supported", name, format);
    if (!path) {
        ret = resolve_plain_name(img, "backing file", name, &resolved);
        if (ret < 0)
            return ret;
        path = resolved;
    }
    if (img->io->dev || img->io->ino) {
        chain.dev[0] = img->io->dev;
        chain.ino[0] = img->io->ino;
        chain.count = 1;
    }
    qcow2_open_opts_init(&opts);
    opts.read_write = read_write;
    opts.allow_raw = 1;
    ret = open_image(path, &opts, img->depth + 1, &chain, kind, NULL,
                     read_write ? img->io : NULL, out, &err);
    if (ret < 0)
        qcow2_fail(img, ret, "backing file '%s': %s", name,
                   without_path(&err, path));
    free(resolved);
    return ret;
}

int qcow2_open_memory(const void *data, size_t len,
                      const qcow2_open_opts *opts, qcow2_image **out,
                      qcow2_error *err)
{
    qcow2_open_opts mem_opts;
    qcow2_error scratch;
    file_chain chain = { 0, { 0 }, { 0 } };
    qcow2_io *io;
    int ret;

    if (!err)
        err = &scratch;
    err->code = 0;
    err->msg[0] = '\0';
    *out = NULL;
    if (opts)
        mem_opts = *opts;
    else
        qcow2_open_opts_init(&mem_opts);
    /* No folder to resolve names in: the chain stays closed. */
    mem_opts.no_backing = 1;
    if (!data && len)
        return qcow2_error_set(err, QCOW2_E_INVALID, "no buffer given");
    ret = qcow2_io_open_memory(data, len, mem_opts.read_write, &io);
    if (ret < 0)
        return qcow2_error_set(err, ret, "%s: out of memory for %zu bytes",
                               MEMORY_IMAGE_NAME, len);
    return open_image(MEMORY_IMAGE_NAME, &mem_opts, 0, &chain,
                      mem_opts.allow_raw ? FORMAT_PROBE : FORMAT_QCOW2, io,
                      NULL, out, err);
}

void qcow2_close(qcow2_image *img)
{
    if (!img)
        return;
    /* Read-write: flush, clear the dirty bit (write_state.c). */
    if (img->ws)
        (void)qcow2_write_state_close(img);
    if (img->owns_backing)
        qcow2_close(img->backing);
    qcow2_handle_free(img);     /* handle.c */
}

const char *qcow2_probe(const char *path, uint32_t *version,
                        qcow2_error *err)
{
    char text[128];
    uint8_t start[8];
    qcow2_io *io;
    int64_t n;
    int sys_errno = 0, ret;

    if (version)
        *version = 0;
    ret = qcow2_io_open_file(path, 0, &io, &sys_errno);
    if (ret < 0) {
        if (err)
            qcow2_error_set(err, ret, "%s: %s", path,
                            qcow2_errno_text(sys_errno, text, sizeof text));
        return NULL;
    }
    n = io->ops->pread(io, start, sizeof start, 0);
    if (n < 0) {
        if (err)
            qcow2_error_set(err, (int)n, "%s: cannot read the header: %s",
                            path, qcow2_errno_text(io->last_errno, text,
                                             sizeof text));
        qcow2_io_close(io);
        return NULL;
    }
    qcow2_io_close(io);
    /* The magic decides: a qcow2 file of an unknown version is still no
     * raw disk (qcow2_open then names the version it refuses). */
    if (n < 4 || be32(start) != QCOW2_MAGIC)
        return "raw";
    if (version && n >= 8)
        *version = be32(start + 4);
    return "qcow2";
}
