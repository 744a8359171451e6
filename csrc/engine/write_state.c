/*
 * The state of a read-write handle (QEMU's qcow2_do_open/qcow2_close write
 * side): runtime options, autoclear bits, persistent bitmaps marked in
 * use, the dirty bit of lazy refcounts (set before the first deferred
 * update, cleared on a clean close); flush, raw file access and the write
 * trace. The repair of a dirty image at open is image.c's.
 */
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

/* Autoclear bits this engine keeps consistent (bitmaps: by marking them
 * in use, see mark_bitmaps_in_use). */
#define AUTOCLEAR_KNOWN  (AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW)

/* ---- Guards ----------------------------------------------------------------- */

int qcow2_check_writable(qcow2_image *img)
{
    if (img->read_only || !img->ws || img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_READONLY, "image is open read-only");
    if (img->ws->poisoned) {
        img->err = img->ws->poison;
        return img->ws->poison.code;
    }
    return 0;
}

/* Lazy refcounts: the dirty bit reaches the disk before any refcount
 * update may lag behind its L2 entry (QEMU's qcow2_mark_dirty). */
static int mark_dirty(qcow2_image *img)
{
    int rc;

    if (img->ws->dirty_on_disk ||
        (img->hdr.incompatible_features & INCOMPAT_DIRTY)) {
        img->ws->dirty_on_disk = 1;
        return 0;
    }
    rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_feature(img, 0, 0, 1);
    if (rc == 0)
        img->ws->dirty_on_disk = 1;
    return rc;
}

int qcow2_begin_update(qcow2_image *img)
{
    int rc = qcow2_check_writable(img);

    if (rc < 0 || img->is_raw || !img->ws->lazy_refcounts)
        return rc;
    return mark_dirty(img);
}

/* ---- Guest calls ------------------------------------------------------------ */

void qcow2_call_begin(qcow2_image *img)
{
    if (img->ws)
        img->ws->call_depth++;
}

int qcow2_call_end(qcow2_image *img, int rc)
{
    qcow2_write_state *ws = img->ws;

    if (!ws)
        return rc;
    /* Writethrough: durable on return; a nested call leaves it to the
     * outer one. */
    if (--ws->call_depth == 0 && rc == 0 && !ws->meta_write_back &&
        !ws->poisoned && !img->read_only)
        rc = qcow2_sync(img);
    return rc;
}

/* ---- Persistent bitmaps ------------------------------------------------- */

/*
 * Guest writes would make the bitmaps stale: flag every one in use, as
 * QEMU does on a read-write open (it clears the flag when it stores them
 * at close; this engine does not track dirty regions, so they stay in use
 * and QEMU reports them inconsistent rather than trusting them). A
 * directory that cannot be walked loses autoclear bit 0 instead.
 */
static int mark_bitmaps_in_use(qcow2_image *img)
{
    uint64_t size = img->ext.bitmap_directory_size;
    uint64_t offset = img->ext.bitmap_directory_offset;
    uint8_t *dir;
    int rc, changed = 0;

    if (!img->ext.has_bitmaps ||
        !(img->hdr.autoclear_features & AUTOCLEAR_BITMAPS))
        return 0;
    if (size == 0 || size > (64u << 20))
        return qcow2_header_set_feature(img, 2, 0, 0);
    dir = malloc((size_t)size);
    if (!dir)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    rc = qcow2_read_meta(img, offset, dir, (size_t)size, "bitmap directory");
    for (uint64_t at = 0; rc == 0 && at + 24 <= size;) {
        uint32_t flags = be32(dir + at + 12);
        uint64_t entry = align_up(24 + (uint64_t)be32(dir + at + 20) +
                                  be16(dir + at + 18), 8);
        if (!(flags & 1)) {
            put_be32(dir + at + 12, flags | 1);
            changed = 1;
        }
        at += entry;
    }
    if (rc == 0 && changed)
        rc = qcow2_write_checked(img, OVERLAP_BITMAP_DIR, "bitmap_directory",
                                 offset, dir, (size_t)size);
    if (rc == 0 && changed)
        rc = qcow2_barrier(img);
    free(dir);
    return rc;
}

/* ---- Open and close ---------------------------------------------------------- */

static int overlap_mask(int mode)
{
    switch (mode) {
    case 0:  return 0;
    case 1:  return OVERLAP_CONSTANT;
    case 3:  return OVERLAP_ALL;
    default: return OVERLAP_CACHED;
    }
}

static int set_options(qcow2_image *img, const qcow2_open_opts *opts)
{
    qcow2_write_state *ws = img->ws;
    int lazy = opts->lazy_refcounts;

    ws->overlap_checks = overlap_mask(opts->overlap_check);
    ws->discard_passthrough = opts->discard != 0;
    if (lazy < 0)
        lazy = (img->hdr.compatible_features & COMPAT_LAZY_REFCOUNTS) != 0;
    if (lazy && img->hdr.version < 3)
        return qcow2_fail(img, QCOW2_E_INVALID, "Lazy refcounts require a "
                          "qcow2 image with at least qemu 1.1 "
                          "compatibility level");
    ws->lazy_refcounts = lazy != 0;
    /* "writeback" and "unsafe" keep metadata dirty; "unsafe" never syncs. */
    ws->meta_write_back = opts->cache_mode != 1;
    ws->no_sync = opts->cache_mode == 2;
    ws->reserve_batches = opts->cache_mode == 1;
    return 0;
}

int qcow2_write_state_init(qcow2_image *img, const qcow2_open_opts *opts)
{
    uint64_t incompat = img->hdr.incompatible_features;
    int rc;

    if (!img->ws) {
        img->ws = malloc(sizeof *img->ws);
        if (!img->ws)
            return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        qcow2_write_state_defaults(img->ws);
    }
    if (img->is_raw)
        return 0;
    rc = set_options(img, opts);
    if (rc < 0)
        return rc;
    if ((incompat & INCOMPAT_CORRUPT) && !opts->repair)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "image is corrupt; open "
                          "read-only or with repair");
    if (img->hdr.version >= 3 &&
        (img->hdr.autoclear_features & ~AUTOCLEAR_KNOWN)) {
        /* Before the first change: whatever they vouched for, this
         * writer does not keep up to date. One synced 8-byte write. */
        uint8_t bytes[8];
        put_be64(bytes, img->hdr.autoclear_features & AUTOCLEAR_KNOWN);
        rc = qcow2_write_checked(img, OVERLAP_HEADER, "header", 88, bytes,
                                 sizeof bytes);
        if (rc == 0)
            rc = qcow2_barrier(img);
        if (rc == 0)
            img->hdr.autoclear_features &= AUTOCLEAR_KNOWN;
        if (rc < 0)
            return rc;
    }
    /* Overlap checks search sorted indexes, not every table entry, on
     * each write (overlap.c); held for the handle's life. */
    if (!img->ws->index)
        qcow2_overlap_index_hold(img);
    /* A dirty image is repaired by the open once the handle is whole
     * (image.c), not from here. */
    return mark_bitmaps_in_use(img);
}

int qcow2_write_state_close(qcow2_image *img)
{
    qcow2_write_state *ws = img->ws;
    int rc = 0;

    if (!ws)
        return 0;
    if (!ws->poisoned && !img->is_raw) {
        /* The dirty caches, then a sync: once everything is on disk, the
         * refcounts the dirty bit covered are right again. */
        rc = qcow2_meta_flush(img);
        if (rc == 0)
            rc = qcow2_sync(img);
        if (rc == 0 && ws->dirty_on_disk &&
            (img->hdr.incompatible_features & INCOMPAT_DIRTY))
            rc = qcow2_header_set_feature(img, 0, 0, 0);
    } else if (img->is_raw) {
        rc = qcow2_sync(img);
    }
    while (ws->index)
        qcow2_overlap_index_release(img);
    free(ws->spare_table);
    free(ws->spare_released);
    free(ws->spare_block);
    free(ws);
    img->ws = NULL;
    return rc;
}

/* ---- Flush, raw access, trace -------------------------------------------- */

int qcow2_flush(qcow2_image *img)
{
    int rc = qcow2_check_writable(img);

    if (rc == 0)
        rc = qcow2_meta_flush(img);
    return rc < 0 ? rc : qcow2_sync(img);
}

int qcow2_raw_read(qcow2_image *img, uint64_t offset, void *buf,
                   size_t length, size_t *done)
{
    size_t got = 0;
    /* The file as the metadata says now: dirty tables written first. */
    int rc = qcow2_meta_flush(img);

    if (rc < 0)
        return rc;
    while (got < length) {
        int64_t n = img->io->ops->pread(img->io, (uint8_t *)buf + got,
                                        length - got, offset + got);
        if (n < 0) {
            if (done)
                *done = got;
            return qcow2_fail(img, (int)n, "raw read of %zu bytes at 0x%llx "
                              "failed", length - got,
                              (unsigned long long)(offset + got));
        }
        if (n == 0)
            break;
        got += (size_t)n;
    }
    if (done)
        *done = got;
    return 0;
}

int qcow2_raw_write(qcow2_image *img, uint64_t offset, const void *buf,
                    size_t length)
{
    int rc;

    if (img->read_only || !img->ws || img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_READONLY, "image is open read-only");
    if (!range_inside(offset, length, QCOW2_MAX_HOST_OFFSET + 1))
        return qcow2_fail(img, QCOW2_E_INVALID, "raw write past the largest "
                          "host offset");
    /* Dirty tables first: the poke must not be overwritten by them. */
    rc = qcow2_meta_flush(img);
    if (rc < 0)
        return rc;
    /* Deliberately past the overlap check: tests poke metadata. */
    qcow2_io_set_label(img->io, "raw");
    rc = img->io->ops->pwrite(img->io, buf, length, offset);
    /* Refcount blocks too (refcount_cache.c), even after a failed write. */
    qcow2_refcount_cache_drop_all(img);
    if (rc < 0)
        return qcow2_fail(img, rc, "raw write of %zu bytes at 0x%llx failed",
                          length, (unsigned long long)offset);
    /* Whatever was cached may be what was just overwritten. */
    qcow2_l2_cache_drop_all(img->l2_cache);
    if (img->codec)
        qcow2_codec_forget(img->codec);
    return 0;
}

size_t qcow2_io_log_count(const qcow2_image *img)
{
    return img ? qcow2_io_trace_count(img->io) : 0;
}

int qcow2_io_log_at(const qcow2_image *img, size_t index,
                    qcow2_io_record *out)
{
    const qcow2_io_trace_entry *e = img ? qcow2_io_trace_at(img->io, index)
                                        : NULL;

    if (!e)
        return QCOW2_E_INVALID;
    out->offset = e->offset;
    out->length = e->length;
    out->what = e->what;
    return 0;
}
