/*
 * Guest extent map with the semantics of `qemu-img map --output=json` in
 * QEMU 7.2 (format doc 12.1): each guest range is described by the first
 * level of the backing chain that has it allocated (data, zero or
 * compressed), or as unallocated at the deepest level looked at; adjacent
 * extents are merged as qemu-img merges them.
 *
 * What qemu-img does at a level whose range is unallocated (block/io.c):
 * without a backing image, or at or past the backing image's length, the
 * range is reported as zeroes at this level (our UNALLOCATED, depth =
 * this level); otherwise the backing image is asked about the same range,
 * cut to the backing image's length.
 *
 * A range whose metadata cannot be followed (cluster.c's damaged runs) is
 * a CORRUPT extent carrying the one-line reason, at the level where the
 * damage is; it never merges, and the rest of the disk still maps.
 *
 * Raw images (as backing files or on top) are asked about holes the way
 * QEMU's file driver does, with SEEK_DATA/SEEK_HOLE: a data extent is DATA,
 * a hole (or the tail up to the 512-byte-rounded length past EOF) is ZERO;
 * both carry the guest offset as their offset.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "read_path.h"

/* QEMU's block layer counts lengths in 512-byte sectors. */
#define SECTOR_SIZE 512u

/* A file whose holes we ask about, opened once per qcow2_map call. No
 * one writes during the call (a map callback must not), so what the file
 * said stays true until it ends: its size, and the last data and hole
 * regions SEEK_DATA/SEEK_HOLE found (a metadata-preallocated image asks
 * about every cluster, several times for one split by a hole). */
typedef struct host_file {
    const qcow2_io *io;
    int fd;                     /* -1: holes unknown, all data */
    int has_size;
    uint64_t size;
    uint64_t data_start, data_end;  /* known data, empty when equal */
    uint64_t hole_start, hole_end;  /* known hole */
} host_file;

/* QEMU's per-image guess that the image was made with
 * preallocation=metadata (see probe_preallocation). */
typedef struct prealloc_guess {
    const qcow2_image *img;
    int yes;
} prealloc_guess;

#define MAX_LEVELS (QCOW2_MAX_CHAIN_DEPTH + 1)

/* An extent and what qemu-img calls "data": true, "zero": true: a data
 * cluster over a hole of its file, reported only for images QEMU guesses
 * to be metadata-preallocated. */
typedef struct map_extent {
    qcow2_extent e;
    int data_zero;
    char reason[QCOW2_ERRMSG_MAX];  /* corrupt: the lookup's message */
} map_extent;

typedef struct map_state {
    qcow2_image *top;
    qcow2_extent_fn fn;
    void *ctx;
    map_extent pending;         /* being merged, length 0 = none */
    host_file files[2 * MAX_LEVELS];
    int n_files;
    prealloc_guess guesses[MAX_LEVELS];
    int n_guesses;
} map_state;

/* What QEMU's file driver says about [offset, offset+bytes) of a file. */
typedef struct file_status {
    uint64_t length;            /* bytes in the same state, 0 past EOF */
    int zero;                   /* a hole */
    int eof;                    /* the state runs to the end of the file */
} file_status;

/* ---- Host files ---------------------------------------------------------------- */

static char *file_path(const qcow2_image *img, const qcow2_io *io)
{
    const char *name = io == img->io ? img->path : img->data_file_ext;
    size_t dir_len;
    char *path;

    if (!name)
        return NULL;
    if (io == img->io || name[0] == '/' || !img->dir)
        return strdup(name);
    dir_len = strlen(img->dir);
    path = malloc(dir_len + strlen(name) + 2);
    if (path)
        sprintf(path, "%s/%s", img->dir, name);
    return path;
}

/* A descriptor for io's file, or -1 when it cannot be had: only a file
 * whose device and inode match the handle's I/O is trusted. */
static int open_same_file(const qcow2_image *img, const qcow2_io *io)
{
    char *path = io->ino != 0 ? file_path(img, io) : NULL;
    struct stat st;
    int fd = -1;

    if (path)
        fd = open(path, O_RDONLY | O_CLOEXEC);
    free(path);
    if (fd >= 0 && (fstat(fd, &st) != 0 || (uint64_t)st.st_dev != io->dev ||
                    (uint64_t)st.st_ino != io->ino)) {
        close(fd);
        fd = -1;
    }
    return fd;
}

/* io's entry, opened on first use; NULL when the table is full (holes
 * then unknown). */
static host_file *host_entry(map_state *ms, const qcow2_image *img,
                             const qcow2_io *io)
{
    host_file *hf;

    for (int i = 0; i < ms->n_files; i++) {
        if (ms->files[i].io == io)
            return &ms->files[i];
    }
    if (ms->n_files == (int)(sizeof ms->files / sizeof ms->files[0]))
        return NULL;
    hf = &ms->files[ms->n_files++];
    memset(hf, 0, sizeof *hf);
    hf->io = io;
    hf->fd = open_same_file(img, io);
    return hf;
}

/* io's size, asked once per walk. */
static int host_size(map_state *ms, const qcow2_image *img, qcow2_io *io,
                     uint64_t *size)
{
    host_file *hf = host_entry(ms, img, io);
    int rc;

    if (hf && hf->has_size) {
        *size = hf->size;
        return 0;
    }
    rc = io->ops->size(io, size);
    if (rc == 0 && hf) {
        hf->size = *size;
        hf->has_size = 1;
    }
    return rc;
}

static void host_close_all(map_state *ms)
{
    for (int i = 0; i < ms->n_files; i++) {
        if (ms->files[i].fd >= 0)
            close(ms->files[i].fd);
    }
    ms->n_files = 0;
}

/* file-posix's block status: SEEK_DATA/SEEK_HOLE within the file's length
 * rounded up to whole sectors; no hole information means all data. */
static void host_status(host_file *hf, uint64_t total, uint64_t offset,
                        uint64_t bytes, file_status *st)
{
    int fd = hf ? hf->fd : -1;
    off_t data, hole;

    memset(st, 0, sizeof *st);
    if (offset >= total) {
        st->eof = 1;
        return;
    }
    st->length = min_u64(bytes, total - offset);
    if (fd >= 0 && offset >= hf->data_start && offset < hf->data_end) {
        st->length = min_u64(st->length, hf->data_end - offset);
    } else if (fd >= 0 && offset >= hf->hole_start &&
               offset < hf->hole_end) {
        st->zero = 1;
        st->length = min_u64(st->length, hf->hole_end - offset);
    } else if (fd >= 0 && offset <= (uint64_t)INT64_MAX) {
        data = lseek(fd, (off_t)offset, SEEK_DATA);
        if (data < 0 && errno == ENXIO) {
            st->zero = 1;       /* a trailing hole */
            hf->hole_start = offset;
            hf->hole_end = UINT64_MAX;
        } else if (data > (off_t)offset) {
            st->zero = 1;
            st->length = min_u64(st->length, (uint64_t)data - offset);
            hf->hole_start = offset;
            hf->hole_end = (uint64_t)data;
        } else if (data == (off_t)offset) {
            hole = lseek(fd, (off_t)offset, SEEK_HOLE);
            if (hole > (off_t)offset) {
                st->length = min_u64(st->length, (uint64_t)hole - offset);
                hf->data_start = offset;
                hf->data_end = (uint64_t)hole;
            }
        }
    }
    st->eof = offset + st->length == total;
}

/* The length QEMU's block layer sees for a file: whole sectors. */
static uint64_t sector_length(uint64_t bytes)
{
    return bytes > UINT64_MAX - SECTOR_SIZE ? bytes
                                            : align_up(bytes, SECTOR_SIZE);
}

/* The length of a level as a backing image: a raw file counts whole
 * sectors, a qcow2 image its virtual size. */
static uint64_t level_length(const qcow2_image *img)
{
    return img->is_raw ? sector_length(img->size) : img->size;
}

static void raw_status(map_state *ms, const qcow2_image *img,
                       uint64_t offset, uint64_t max_len, map_extent *me)
{
    file_status st;

    host_status(host_entry(ms, img, img->io), level_length(img), offset,
                max_len, &st);
    me->e.type = st.zero ? QCOW2_EXTENT_ZERO : QCOW2_EXTENT_DATA;
    me->e.length = st.length ? st.length : max_len;
    me->e.has_offset = 1;
    me->e.offset = offset;
}

/* ---- qcow2 levels ------------------------------------------------------------ */

/*
 * QEMU 7.2 (qcow2_detect_metadata_preallocation) guesses that an image was
 * preallocated with metadata when the clusters with a refcount outnumber
 * the clusters the host filesystem really holds by a ninth (and by two).
 * It then asks the file about every data cluster and reports holes as
 * zeroes. Failures just mean "no", as in QEMU.
 */
static int probe_preallocation(qcow2_image *img)
{
    uint64_t file_length, allocated, real_clusters, threshold;
    uint64_t end_cluster, count = 0;
    qcow2_error saved = img->err;   /* a failed probe is not an error */

    if (img->io->ops->size(img->io, &file_length) < 0 ||
        !img->io->ops->allocated ||
        img->io->ops->allocated(img->io, &allocated) < 0)
        return 0;
    real_clusters = allocated / img->cluster_size;
    threshold = max_u64(real_clusters * 10 / 9, real_clusters + 2);
    end_cluster = div_round_up(file_length, img->cluster_size);
    if (qcow2_count_used_clusters(img, end_cluster, &count) < 0) {
        img->err = saved;
        return 0;
    }
    return count >= threshold;
}

static int preallocated(map_state *ms, qcow2_image *img)
{
    int yes;

    for (int i = 0; i < ms->n_guesses; i++) {
        if (ms->guesses[i].img == img)
            return ms->guesses[i].yes;
    }
    yes = probe_preallocation(img);
    if (ms->n_guesses < MAX_LEVELS) {
        ms->guesses[ms->n_guesses].img = img;
        ms->guesses[ms->n_guesses].yes = yes;
        ms->n_guesses++;
    }
    return yes;
}

/* block/io.c's BDRV_BLOCK_RECURSE step: a data extent of a preallocated
 * image is cut to what its file holds, and a hole (or the part past EOF)
 * reads as zeroes. */
static void recurse_into_file(map_state *ms, qcow2_image *img,
                              map_extent *me)
{
    qcow2_io *io = img->data_io ? img->data_io : img->io;
    uint64_t file_length;
    file_status st;

    if (host_size(ms, img, io, &file_length) < 0)
        return;
    host_status(host_entry(ms, img, io), sector_length(file_length),
                me->e.offset, me->e.length, &st);
    if (st.eof && (st.length == 0 || st.zero)) {
        me->data_zero = 1;
        return;
    }
    me->e.length = st.length;
    me->data_zero = st.zero;
}

/* A failure at a backing level is reported on the top handle. */
static int level_failed(map_state *ms, qcow2_image *level, int rc)
{
    if (level != ms->top) {
        ms->top->err = level->err;
        if (ms->top->err.code == 0)
            ms->top->err.code = rc;
    }
    return rc;
}

static int level_status(map_state *ms, qcow2_image *img, int depth,
                        uint64_t offset, uint64_t max_len, map_extent *me)
{
    int hide_offset = img->hdr.crypt_method != CRYPT_NONE;
    qcow2_image *backing = img->backing;
    qcow2_extent *e = &me->e;
    qcow2_run run;
    int rc;

    memset(me, 0, sizeof *me);
    e->start = offset;
    e->depth = depth;
    if (img->is_raw) {
        raw_status(ms, img, offset, max_len, me);
        return 0;
    }
    rc = qcow2_lookup_span(img, offset, max_len, &run);
    if (rc < 0)
        return level_failed(ms, img, rc);
    e->length = run.length;
    switch (run.type) {
    case SC_CORRUPT:
        e->type = QCOW2_EXTENT_CORRUPT;
        snprintf(me->reason, sizeof me->reason, "%s", qcow2_errmsg(img));
        return 0;
    case SC_NORMAL:
        e->type = QCOW2_EXTENT_DATA;
        break;
    case SC_COMPRESSED:
        /* qemu-img shows no offset; the binding hides it too. */
        e->type = QCOW2_EXTENT_COMPRESSED;
        e->has_offset = 1;
        e->offset = run.host_offset;
        e->compressed_size = run.compressed_size;
        return 0;
    case SC_ZERO_PLAIN:
    case SC_ZERO_ALLOC:
        e->type = QCOW2_EXTENT_ZERO;
        break;
    default:
        if (backing && offset < level_length(backing) &&
            depth < QCOW2_MAX_CHAIN_DEPTH)
            return level_status(ms, backing, depth + 1, offset,
                                min_u64(run.length,
                                        level_length(backing) - offset), me);
        e->type = QCOW2_EXTENT_UNALLOCATED;
        break;
    }
    /* QEMU gives an offset for the types with a host cluster, unless the
     * data is encrypted. */
    if (sc_type_has_host(run.type) && !hide_offset) {
        e->has_offset = 1;
        e->offset = run.host_offset;
        if (run.type == SC_NORMAL && preallocated(ms, img))
            recurse_into_file(ms, img, me);
    }
    return 0;
}

/* ---- Merging ------------------------------------------------------------------- */

/* qemu-img's entry_mergeable. Compressed clusters carry no offset in
 * qemu-img, so neighbours merge whatever their streams' offsets. */
static int mergeable(const map_extent *a, const map_extent *b)
{
    if (a->e.type == QCOW2_EXTENT_CORRUPT ||
        a->e.type != b->e.type || a->e.depth != b->e.depth ||
        a->data_zero != b->data_zero ||
        a->e.start + a->e.length != b->e.start)
        return 0;
    if (a->e.type == QCOW2_EXTENT_COMPRESSED)
        return 1;
    if (a->e.has_offset != b->e.has_offset)
        return 0;
    return !a->e.has_offset || a->e.offset + a->e.length == b->e.offset;
}

static int deliver(map_state *ms, map_extent *me)
{
    me->e.reads_zero = me->data_zero;
    me->e.reason = me->e.type == QCOW2_EXTENT_CORRUPT ? me->reason : NULL;
    return ms->fn(ms->ctx, &me->e);
}

static int emit(map_state *ms, const map_extent *me)
{
    map_extent *p = &ms->pending;
    int rc;

    if (p->e.length && mergeable(p, me)) {
        p->e.length += me->e.length;
        p->e.compressed_size += me->e.compressed_size;
        return 0;
    }
    if (p->e.length) {
        rc = deliver(ms, p);
        if (rc != 0)
            return rc;
    }
    *p = *me;
    return 0;
}

static int map_range(map_state *ms, uint64_t offset, uint64_t length)
{
    uint64_t guest = offset, end = offset + length;
    map_extent me;
    int rc;

    while (guest < end) {
        rc = level_status(ms, ms->top, 0, guest, end - guest, &me);
        if (rc < 0)
            return rc;
        if (me.e.length == 0)
            return qcow2_fail(ms->top, QCOW2_E_CORRUPT,
                              "guest offset 0x%" PRIx64 ": empty extent",
                              guest);
        rc = emit(ms, &me);
        if (rc != 0)
            return rc;
        guest += me.e.length;
    }
    return ms->pending.e.length ? deliver(ms, &ms->pending) : 0;
}

static int map_work(qcow2_image *img, uint64_t offset, uint64_t length,
                    qcow2_extent_fn fn, void *ctx)
{
    map_state ms;
    int rc;

    if (!range_inside(offset, length, img->size))
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "map of %" PRIu64 " bytes at 0x%" PRIx64
                          " is outside the disk (size 0x%" PRIx64 ")",
                          length, offset, img->size);
    memset(&ms, 0, sizeof ms);
    ms.top = img;
    ms.fn = fn;
    ms.ctx = ctx;
    rc = map_range(&ms, offset, length);
    host_close_all(&ms);
    return rc;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_map(qcow2_image *img, uint64_t offset, uint64_t length,
              qcow2_extent_fn fn, void *ctx)
{
    int rc = qcow2_meta_flush(img);

    return rc < 0 ? rc : map_work(img, offset, length, fn, ctx);
}
