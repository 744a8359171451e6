/*
 * qcow2_create: a new image laid out exactly as qemu-img 7.2 lays it out
 * (QEMU's qcow2_co_create): cluster 0 header, cluster 1 refcount table,
 * cluster 2 first refcount block, then the L1 table sized for the disk at
 * cluster 3 and, with preallocation, L2 tables and data. The file is
 * built through a private bootstrap handle running the same write engine
 * as any open image, then opened read-write for the caller.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "crypto.h"
#include "lock.h"
#include "ops.h"

enum prealloc_mode { PREALLOC_OFF, PREALLOC_METADATA, PREALLOC_FALLOC,
                     PREALLOC_FULL };

/* The options once checked, in the header's terms. */
typedef struct create_plan {
    uint64_t size;
    uint32_t version;
    uint32_t cluster_bits;
    uint32_t refcount_order;
    int prealloc;
    int compression_type;
    uint32_t crypt_method;
    qcow2_encrypt_opts encrypt; /* with qemu-img's defaults filled in */
    const qcow2_create_opts *opts;
} create_plan;

void qcow2_create_opts_init(qcow2_create_opts *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->version = 3;
    opts->cluster_size = 65536;
    opts->refcount_bits = 16;
}

/* ---- Validation (qemu-img 7.2's refusals, in its order) ---------------- */

static int log2_exact(uint64_t value)
{
    if (value == 0 || (value & (value - 1)))
        return -1;
    return __builtin_ctzll(value);
}

static int parse_prealloc(const char *name)
{
    if (!name || !strcmp(name, "off"))
        return PREALLOC_OFF;
    if (!strcmp(name, "metadata"))
        return PREALLOC_METADATA;
    if (!strcmp(name, "falloc"))
        return PREALLOC_FALLOC;
    if (!strcmp(name, "full"))
        return PREALLOC_FULL;
    return -1;
}

#define NEEDS_V3 "compatibility level 1.1 and above (use version=v3 or " \
                 "greater)"

static int check_geometry(const qcow2_create_opts *o, create_plan *plan,
                          qcow2_error *err)
{
    int bits;

    if (o->version != 2 && o->version != 3)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Parameter 'version' "
                               "does not accept value '%u'", o->version);
    plan->version = o->version;
    if (o->extended_l2 && plan->version < 3)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Extended L2 entries "
                               "are only supported with " NEEDS_V3);
    bits = log2_exact(o->cluster_size);
    if (bits < (int)QCOW2_MIN_CLUSTER_BITS ||
        bits > (int)QCOW2_MAX_CLUSTER_BITS)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Cluster size must be "
                               "a power of two between 512 and 2048k");
    if (o->extended_l2 && o->cluster_size < 512u * 32)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Extended L2 entries "
                               "are only supported with cluster sizes of at "
                               "least 16384 bytes");
    plan->cluster_bits = (uint32_t)bits;
    return 0;
}

static int check_features(const qcow2_create_opts *o, create_plan *plan,
                          qcow2_error *err)
{
    int order;

    plan->prealloc = parse_prealloc(o->preallocation);
    if (plan->prealloc < 0)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Parameter "
                               "'preallocation' does not accept value '%s'",
                               o->preallocation);
    if (o->backing_file && plan->prealloc != PREALLOC_OFF && !o->extended_l2)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Backing file and "
                               "preallocation can only be used at the same "
                               "time if extended_l2 is on");
    if (o->backing_format && !o->backing_file)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Backing format cannot "
                               "be used without backing file");
    if (o->lazy_refcounts && plan->version < 3)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Lazy refcounts only "
                               "supported with " NEEDS_V3);
    order = log2_exact(o->refcount_bits);
    if (order < 0 || order > QCOW2_REFCOUNT_ORDER_MAX)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Refcount width must be "
                               "a power of two and may not exceed 64 bits");
    if (plan->version < 3 && o->refcount_bits != 16)
        /* qemu-img 7.2 words this one refusal "or above" */
        return qcow2_error_set(err, QCOW2_E_INVALID, "Different refcount "
                               "widths than 16 bits require compatibility "
                               "level 1.1 or above (use version=v3 or "
                               "greater)");
    plan->refcount_order = (uint32_t)order;
    if (o->data_file_raw && !o->data_file)
        return qcow2_error_set(err, QCOW2_E_INVALID,
                               "data-file-raw requires data-file");
    if (o->data_file_raw && o->backing_file)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Backing file and "
                               "data-file-raw cannot be used at the same "
                               "time");
    /* The raw data file must read the same through the metadata. */
    if (o->data_file_raw && plan->prealloc == PREALLOC_OFF)
        plan->prealloc = PREALLOC_METADATA;
    if (o->data_file && plan->version < 3)
        return qcow2_error_set(err, QCOW2_E_INVALID, "External data files "
                               "are only supported with " NEEDS_V3);
    return 0;
}

static int check_names(const qcow2_create_opts *o, create_plan *plan,
                       qcow2_error *err)
{
    plan->compression_type = COMPRESSION_ZLIB;
    if (o->compression_type && strcmp(o->compression_type, "zlib")) {
        if (strcmp(o->compression_type, "zstd"))
            return qcow2_error_set(err, QCOW2_E_INVALID, "Parameter "
                                   "'compression-type' does not accept "
                                   "value '%s'", o->compression_type);
        if (plan->version < 3)
            return qcow2_error_set(err, QCOW2_E_INVALID, "Non-zlib "
                                   "compression type is only supported "
                                   "with " NEEDS_V3);
        plan->compression_type = COMPRESSION_ZSTD;
    }
    /* qemu-img no longer guesses the backing format. */
    if (o->backing_file && !o->backing_format)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Backing file "
                               "specified without backing format");
    if (o->backing_file && (strlen(o->backing_file) == 0 ||
                            strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME))
        return qcow2_error_set(err, QCOW2_E_INVALID, "backing file name "
                               "must be 1 to %u bytes",
                               QCOW2_MAX_BACKING_NAME);
    if (o->backing_format &&
        strlen(o->backing_format) > QCOW2_MAX_BACKING_FORMAT)
        return qcow2_error_set(err, QCOW2_E_INVALID, "backing format name "
                               "'%s' is too long", o->backing_format);
    if (o->data_file && strlen(o->data_file) == 0)
        return qcow2_error_set(err, QCOW2_E_INVALID, "data file name is "
                               "empty");
    return 0;
}

static int check_size(const qcow2_create_opts *o, create_plan *plan,
                      qcow2_error *err)
{
    uint64_t entries;

    /* qemu-img rounds the size up to whole sectors. */
    if (o->size > (uint64_t)INT64_MAX - 511)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Image size must be "
                               "less than 8 EiB!");
    plan->size = align_up(o->size, 512);
    entries = qcow2_l1_entries_for(plan->cluster_bits,
                                   qcow2_l2_bits_for(plan->cluster_bits,
                                                     o->extended_l2),
                                   plan->size);
    if (entries > QCOW2_MAX_L1_BYTES / 8)
        return qcow2_error_set(err, QCOW2_E_INVALID, "The image size is too "
                               "large for file format 'qcow2' (try using a "
                               "larger cluster size)");
    return 0;
}

/* encrypt.*: "aes" or "luks" with a key; the LUKS defaults qemu-img's,
 * except iter_time (1 s). Preallocated clusters would read as the
 * decryption of zeroes: refused. */
static int check_encrypt(const qcow2_create_opts *o, create_plan *plan,
                         qcow2_error *err)
{
    qcow2_encrypt_opts *e = &plan->encrypt;

    *e = o->encrypt;
    if (!e->format)
        return 0;
    if (strcmp(e->format, "aes") == 0)
        plan->crypt_method = CRYPT_AES;
    else if (strcmp(e->format, "luks") == 0)
        plan->crypt_method = CRYPT_LUKS;
    else
        return qcow2_error_set(err, QCOW2_E_INVALID, "unknown encryption "
                               "format '%s'", e->format);
    if (!e->key)
        return qcow2_error_set(err, QCOW2_E_INVALID, "encryption needs a "
                               "key (qemu-img: encrypt.key-secret)");
    if (plan->prealloc != PREALLOC_OFF)
        return qcow2_error_set(err, QCOW2_E_UNSUPPORTED, "preallocation of "
                               "an encrypted image is not supported");
    e->cipher_alg = e->cipher_alg ? e->cipher_alg : "aes-256";
    e->cipher_mode = e->cipher_mode ? e->cipher_mode : "xts";
    e->ivgen_alg = e->ivgen_alg ? e->ivgen_alg : "plain64";
    e->ivgen_hash_alg = e->ivgen_hash_alg ? e->ivgen_hash_alg : "sha256";
    e->hash_alg = e->hash_alg ? e->hash_alg : "sha256";
    e->iter_time_ms = e->iter_time_ms ? e->iter_time_ms : 1000;
    return 0;
}

static int check_opts(const qcow2_create_opts *o, create_plan *plan,
                      qcow2_error *err)
{
    int rc;

    memset(plan, 0, sizeof *plan);
    plan->opts = o;
    rc = check_geometry(o, plan, err);
    if (rc == 0)
        rc = check_features(o, plan, err);
    if (rc == 0)
        rc = check_names(o, plan, err);
    if (rc == 0)
        rc = check_size(o, plan, err);
    if (rc == 0)
        rc = check_encrypt(o, plan, err);
    return rc;
}

/* ---- Files ------------------------------------------------------------------ */

static int status_of_errno(int sys_errno)
{
    switch (sys_errno) {
    case EEXIST:            return QCOW2_E_EXISTS;
    case ENOENT:
    case ENOTDIR:           return QCOW2_E_NOTFOUND;
    case ENOSPC:
    case EDQUOT:            return QCOW2_E_NOSPC;
    case EROFS:
    case EACCES:
    case EPERM:             return QCOW2_E_READONLY;
    case ENOMEM:            return QCOW2_E_NOMEM;
    default:                return QCOW2_E_IO;
    }
}

/*
 * Open a file for creation as QEMU's raw_co_create does: create it (or, not
 * exclusive, open the one there), take the creation locks, refuse a file
 * another process or handle is using ("busy"), and only then empty it, so
 * an image in use is never truncated under its user. Returns the fd or a
 * negative status; `what` prefixes the message ("" or "data file ").
 */
static int open_emptied(const char *path, int exclusive, const char *what,
                        qcow2_error *err)
{
    int flags = O_RDWR | O_CREAT | O_CLOEXEC | (exclusive ? O_EXCL : 0);
    qcow2_lock_conflict conflict;
    qcow2_lock_req req;
    char why[QCOW2_ERRMSG_MAX], text[128];
    int fd, rc;

    do {
        fd = open(path, flags, 0644);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        int e = errno;
        return qcow2_error_set(err, status_of_errno(e), "%s%s: %s", what,
                               path, e == EEXIST ? "file exists"
                               : qcow2_errno_text(e, text, sizeof text));
    }
    qcow2_lock_req_for(LOCK_CREATE, &req);
    rc = qcow2_lock_fd(fd, &req, &conflict);
    if (rc < 0) {
        qcow2_lock_describe(&conflict, 0, why, sizeof why);
        close(fd);
        return qcow2_error_set(err, rc, "%s%s: %s", what, path, why);
    }
    if (ftruncate(fd, 0) < 0) {
        int e = errno;
        close(fd);
        return qcow2_error_set(err, status_of_errno(e), "%s%s: %s", what,
                               path, qcow2_errno_text(e, text, sizeof text));
    }
    return fd;
}

/* Create (or, with overwrite, empty) a file; "exists" when it is there
 * and may not be replaced, "busy" when another holder uses it. */
static int create_file(const char *path, int overwrite, qcow2_error *err)
{
    int fd = open_emptied(path, !overwrite, "", err);

    if (fd < 0)
        return fd;
    close(fd);      /* its locks go with it; the bootstrap takes its own */
    return 0;
}

/* Names in the image resolve against its folder (as the open path does),
 * so the data file is created there too. */
static char *path_next_to(const char *image_path, const char *name)
{
    const char *slash = strrchr(image_path, '/');
    size_t dir_len = slash ? (size_t)(slash - image_path) + 1 : 0;
    char *joined;

    if (name[0] == '/' || dir_len == 0)
        return strdup(name);
    joined = malloc(dir_len + strlen(name) + 1);
    if (!joined)
        return NULL;
    memcpy(joined, image_path, dir_len);
    strcpy(joined + dir_len, name);
    return joined;
}

/* The raw data file, emptied and sized as QEMU's file driver creates it. */
static int create_data_file(const char *path, uint64_t size,
                            qcow2_error *err)
{
    char text[128];
    int fd = open_emptied(path, 0, "data file ", err), rc = 0;

    if (fd < 0)
        return fd;
    if (ftruncate(fd, (off_t)size) < 0)
        rc = qcow2_error_set(err, status_of_errno(errno), "data file %s: "
                             "%s", path,
                             qcow2_errno_text(errno, text, sizeof text));
    close(fd);
    return rc;
}

/* ---- The bootstrap handle ---------------------------------------------------- */

static void bootstrap_free(qcow2_image *img)
{
    if (!img)
        return;
    free(img->ws);
    free(img->l1);
    free(img->reftable);
    qcow2_refcount_cache_free(img->refcount_cache);   /* refcount_cache.c */
    free(img->backing_name);
    free(img->backing_format_ext);
    free(img->data_file_ext);
    if (img->data_io && img->data_io != img->io)
        qcow2_io_close(img->data_io);
    if (img->io)
        qcow2_io_close(img->io);
    free(img->path);
    free(img);
}

static void set_geometry(qcow2_image *img, const create_plan *plan)
{
    const qcow2_create_opts *o = plan->opts;

    qcow2_geometry_set(img, plan->cluster_bits, o->extended_l2,
                       plan->refcount_order);
    img->compression_type = plan->compression_type;
}

/* The header as QEMU's create writes it before sizing the disk. */
static void set_header(qcow2_image *img, const create_plan *plan)
{
    const qcow2_create_opts *o = plan->opts;
    qcow2_header *h = &img->hdr;

    h->magic = QCOW2_MAGIC;
    h->version = plan->version;
    h->cluster_bits = plan->cluster_bits;
    h->refcount_table_offset = img->cluster_size;
    h->refcount_table_clusters = 1;
    h->refcount_order = plan->refcount_order;
    h->header_length = plan->version >= 3 ? 112 : QCOW2_V2_HEADER_LENGTH;
    h->compression_type = (uint8_t)plan->compression_type;
    h->crypt_method = plan->crypt_method;
    if (o->lazy_refcounts)
        h->compatible_features |= COMPAT_LAZY_REFCOUNTS;
    if (o->data_file)
        h->incompatible_features |= INCOMPAT_DATA_FILE;
    if (o->data_file_raw)
        h->autoclear_features |= AUTOCLEAR_DATA_FILE_RAW;
    if (plan->compression_type != COMPRESSION_ZLIB)
        h->incompatible_features |= INCOMPAT_COMPRESSION;
    if (o->extended_l2)
        h->incompatible_features |= INCOMPAT_EXTL2;
}

static int set_names(qcow2_image *img, const qcow2_create_opts *o)
{
    if (o->backing_file && !(img->backing_name = strdup(o->backing_file)))
        return QCOW2_E_NOMEM;
    if (o->backing_format &&
        !(img->backing_format_ext = strdup(o->backing_format)))
        return QCOW2_E_NOMEM;
    if (o->data_file && !(img->data_file_ext = strdup(o->data_file)))
        return QCOW2_E_NOMEM;
    img->ext.backing_format = img->backing_format_ext;
    img->ext.data_file = img->data_file_ext;
    return 0;
}

/* The bootstrap's files, locked as a writer's (QEMU's qcow2 create holds
 * its image the same way while it lays it out). */
static int open_io(const char *path, int lock_role, qcow2_io **io,
                   qcow2_error *err)
{
    qcow2_lock_conflict conflict;
    char why[QCOW2_ERRMSG_MAX];
    char text[128];
    int sys_errno = 0;
    int rc = qcow2_io_open_file(path, 1, io, &sys_errno);

    if (rc < 0)
        return qcow2_error_set(err, rc, "%s: %s", path,
                               sys_errno ? qcow2_errno_text(sys_errno, text,
                                                            sizeof text)
                                         : qcow2_status_name(rc));
    rc = qcow2_io_lock(*io, lock_role, &conflict);
    if (rc < 0) {
        qcow2_lock_describe(&conflict, 0, why, sizeof why);
        return qcow2_error_set(err, rc, "%s: %s", path, why);
    }
    return 0;
}

static int bootstrap_new(const char *path, const char *data_path,
                         const create_plan *plan, qcow2_image **out,
                         qcow2_error *err)
{
    qcow2_image *img = calloc(1, sizeof *img);
    int rc;

    *out = img;
    if (!img || !(img->path = strdup(path)) ||
        !(img->ws = calloc(1, sizeof *img->ws)))
        return qcow2_error_set(err, QCOW2_E_NOMEM, "out of memory");
    qcow2_write_state_defaults(img->ws);
    set_geometry(img, plan);
    set_header(img, plan);
    if (set_names(img, plan->opts) < 0)
        return qcow2_error_set(err, QCOW2_E_NOMEM, "out of memory");
    img->reftable_entries = img->cluster_size / 8;
    img->reftable = calloc(img->reftable_entries, sizeof *img->reftable);
    if (!img->reftable)
        return qcow2_error_set(err, QCOW2_E_NOMEM, "out of memory");
    img->reftable[0] = 2 * img->cluster_size;
    img->owns_io = 1;
    rc = open_io(path, LOCK_QCOW2_RW, &img->io, err);
    if (rc == 0 && data_path)
        rc = open_io(data_path, LOCK_DATA_FILE_RW, &img->data_io, err);
    if (rc == 0 && !data_path)
        img->data_io = img->io;
    return rc;
}

/* Clusters 0..2: a blank header cluster, the refcount table pointing at
 * the block, the block counting all three (what QEMU's create ends with
 * once it has allocated them). The header is written last. */
static int write_first_clusters(qcow2_image *img)
{
    uint64_t cs = img->cluster_size;
    uint8_t *bytes = calloc(3, cs);
    int rc;

    if (!bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    put_be64(bytes + cs, 2 * cs);
    rc = qcow2_write_checked(img, OVERLAP_HEADER | OVERLAP_REFCOUNT_TABLE |
                             OVERLAP_REFCOUNT_BLOCK, "header", 0, bytes,
                             3 * cs);
    free(bytes);
    if (rc == 0)
        rc = qcow2_refcount_update(img, 0, 3 * cs, 1);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        img->ws->free_cluster_hint = 3;
    return rc;
}

/* ---- Preallocation ------------------------------------------------------------ */

/* Give the file bytes [from, to): fallocate for "falloc", zeroes for
 * "full" (QEMU's file driver does the same). */
static int fill_area(qcow2_image *img, qcow2_io *io, const char *path,
                     int mode, uint64_t from, uint64_t to)
{
    if (from >= to)
        return 0;
    if (mode == PREALLOC_FALLOC) {
        int fd = open(path, O_RDWR | O_CLOEXEC), e = 0;
        char text[128];
        if (fd < 0)
            return qcow2_fail(img, status_of_errno(errno), "%s: %s", path,
                              qcow2_errno_text(errno, text, sizeof text));
        e = posix_fallocate(fd, (off_t)from, (off_t)(to - from));
        close(fd);
        if (e)
            return qcow2_fail(img, status_of_errno(e), "preallocation of "
                              "%llu bytes failed: %s",
                              (unsigned long long)(to - from),
                              qcow2_errno_text(e, text, sizeof text));
        return 0;
    }
    {
        size_t chunk = 1u << 20;
        uint8_t *zeroes = calloc(1, chunk);
        int rc = 0;
        if (!zeroes)
            return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        for (uint64_t at = from; at < to && rc == 0; at += chunk) {
            size_t len = (size_t)min_u64(chunk, to - at);
            rc = io == img->io ? qcow2_write_checked(img, 0, "data", at,
                                                     zeroes, len)
                               : qcow2_write_data(img, at, zeroes, len);
        }
        free(zeroes);
        return rc;
    }
}

/* QEMU's falloc/full growth: one new exact refcount table placed after
 * the used clusters, the data area reserved right after it, the file
 * given those bytes, then the L2 tables (first fit) mapping it. */
static int preallocate_data(qcow2_image *img, const char *path, int mode,
                            uint64_t size)
{
    uint64_t cs = img->cluster_size, data_clusters, l2_tables;
    uint64_t file_size, area_start;
    int64_t last;
    int rc;

    data_clusters = div_round_up(size, cs);
    if (data_clusters == 0)
        return 0;
    l2_tables = div_round_up(data_clusters, img->l2_entries) + 1;
    rc = img->io->ops->size(img->io, &file_size);
    if (rc < 0)
        return qcow2_fail(img, rc, "cannot read the file size");
    rc = qcow2_last_used_cluster(img, div_round_up(file_size, cs), &last);
    if (rc < 0)
        return rc;
    rc = qcow2_refcount_area(img, (uint64_t)(last + 1) * cs,
                             data_clusters + l2_tables, 1, 0, 0,
                             &area_start);
    if (rc == 0)
        rc = qcow2_alloc_clusters_at(img, area_start, data_clusters);
    if (rc == 0)
        rc = fill_area(img, img->io, path, mode, area_start,
                       area_start + data_clusters * cs);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_preallocate_metadata(img, 0, size, area_start);
    return rc;
}

static int preallocate(qcow2_image *img, const char *path,
                       const char *data_path, const create_plan *plan)
{
    int rc;

    if (plan->prealloc == PREALLOC_OFF)
        return 0;
    if (data_path) {
        /* Metadata only; the data file itself gets the mode. */
        rc = qcow2_preallocate_metadata(img, 0, plan->size, 0);
        if (rc == 0 && plan->prealloc != PREALLOC_METADATA)
            rc = fill_area(img, img->data_io, data_path, plan->prealloc, 0,
                           plan->size);
        return rc;
    }
    if (plan->prealloc == PREALLOC_METADATA)
        return qcow2_preallocate_metadata(img, 0, plan->size, 0);
    return preallocate_data(img, path, plan->prealloc, plan->size);
}

/* ---- Encryption ------------------------------------------------------------------ */

/* The LUKS region after the L1 table, as QEMU places it: whole clusters,
 * zero padded, written and synced before the header extension names it. */
static int write_luks_region(qcow2_image *img, const create_plan *plan)
{
    uint64_t cs = img->cluster_size, len, offset;
    char why[200] = "";
    uint8_t *region, *padded;
    int rc = qcow2_luks_format(&plan->encrypt, &region, &len, why,
                               sizeof why);

    if (rc < 0)
        return qcow2_fail(img, rc, "%s", why);
    padded = realloc(region, (size_t)align_up(len, cs));
    if (!padded) {
        free(region);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    memset(padded + len, 0, (size_t)(align_up(len, cs) - len));
    rc = qcow2_alloc_clusters(img, div_round_up(len, cs), &offset);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_write_checked(img, 0, "crypto header", offset, padded,
                                 (size_t)align_up(len, cs));
    free(padded);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        return rc;
    img->ext.has_crypto_header = 1;
    img->ext.crypto_header_offset = offset;
    img->ext.crypto_header_length = len;
    return qcow2_header_rewrite(img);
}

/* ---- qcow2_create ---------------------------------------------------------------- */

static int build_image(const char *path, const char *data_path,
                       const create_plan *plan, qcow2_error *err)
{
    qcow2_image *img = NULL;
    uint64_t l1_entries;
    int rc = bootstrap_new(path, data_path, plan, &img, err);

    if (rc < 0)
        goto out;
    rc = write_first_clusters(img);
    if (rc == 0)
        rc = qcow2_header_rewrite(img);
    if (rc == 0)
        rc = qcow2_l1_entries_needed(img, plan->size, &l1_entries) < 0
                 ? qcow2_fail(img, QCOW2_E_INVALID, "size too large")
                 : qcow2_l1_grow(img, l1_entries);
    if (rc == 0 && plan->crypt_method == CRYPT_LUKS)
        rc = write_luks_region(img, plan);
    if (rc == 0)
        rc = preallocate(img, path, data_path, plan);
    if (rc == 0)
        rc = qcow2_header_set_size(img, plan->size);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        *err = img->err;
out:
    bootstrap_free(img);
    return rc;
}

int qcow2_create_layout(const char *path, const qcow2_create_opts *opts,
                        qcow2_error *err)
{
    create_plan plan;
    char *data_path = NULL;
    int rc;

    err->code = 0;
    err->msg[0] = '\0';
    if (!path || !opts)
        return qcow2_error_set(err, QCOW2_E_INVALID, "no path or options");
    rc = check_opts(opts, &plan, err);
    if (rc < 0)
        return rc;
    if (opts->data_file && !(data_path = path_next_to(path, opts->data_file)))
        return qcow2_error_set(err, QCOW2_E_NOMEM, "out of memory");
    rc = create_file(path, opts->overwrite, err);
    if (rc == 0 && data_path)
        /* In raw mode every guest cluster is mapped 1:1, the last one
         * whole, so qemu-img's data file ends on a cluster boundary. */
        rc = create_data_file(data_path, opts->data_file_raw
                                  ? align_up(plan.size, 1ull << plan.cluster_bits)
                                  : plan.size, err);
    if (rc == 0) {
        rc = build_image(path, data_path, &plan, err);
        /* A half-built file is of no use to anyone; but one another
         * holder took meanwhile ("busy") is theirs. */
        if (rc < 0 && rc != QCOW2_E_BUSY)
            unlink(path);
    }
    free(data_path);
    return rc;
}
