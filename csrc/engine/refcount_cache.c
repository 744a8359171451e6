/*
 * Bounded refcount-block cache, one per image handle (issue: "Bounded L2
 * and refcount-block caches (sizes from the open options) that flush
 * refcount blocks before the L2 tables that depend on them").
 *
 * Whole refcount blocks (one cluster each, big-endian/packed exactly as on
 * disk) found by host offset through a chained hash, evicted least
 * recently used first; block buffers are allocated the first time their
 * slot is used: the generic table cache (table_cache.c), as the L2 cache.
 *
 * Write-through unless the handle defers refcounts (cache "writeback" or
 * "unsafe", or lazy refcounts): then alloc.c patches a cached block
 * (qcow2_refcount_cache_patch) and it stays dirty until a flush or an
 * eviction writes it whole; cache_flush.c orders it before the L2 tables
 * that depend on it. Clean blocks hold exactly the bytes on disk, kept so
 * at the one write funnel: qcow2_write_checked tells the
 * cache (the handle's write observer, registered when the cache is made)
 * of every write, and the cache mirrors a successful write of the image
 * file into the cached blocks it overlaps (whoever wrote it: refcount
 * updates, new blocks, repair, amend, guest data landing on a cluster that
 * used to be a block) and drops them when a write fails (the disk is then unknown). Writes that bypass the funnel
 * (qcow2_raw_write, an atomic refcount-table switch elsewhere) call
 * qcow2_refcount_cache_drop_all. Because nothing is ever dirty in here,
 * every refcount increase is on disk when qcow2_refcount_update returns,
 * and the write engine's qcow2_barrier before the L2 entry that depends on
 * it is all it takes: refcount blocks always reach the disk before the L2
 * tables that depend on them (QEMU gets the same order with a write-back
 * cache and qcow2_cache_set_dependency; write-through needs no dependency
 * tracking).
 *
 * Size: QEMU 7.2 (block/qcow2.c read_cache_sizes and
 * qcow2_update_options_prepare) defaults refcount-cache-size to
 * MIN_REFCOUNT_CACHE_SIZE = 4 clusters and clamps smaller settings up to
 * 4 clusters; the old "a quarter of the L2 cache" rule
 * (DEFAULT_L2_REFCOUNT_SIZE_RATIO) is gone since QEMU 3.1. We default to
 * 4 clusters too, but accept a floor of 2 blocks: QEMU's 4 covers blocks
 * pinned dirty during table growth, and nothing is pinned here.
 *
 * Snapshot views and raw images keep no cache (a view's refcount table is
 * a copy its parent may outgrow): their reads go to the file as before.
 */
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "table_cache.h"

#define RC_CACHE_DEFAULT_BLOCKS 4u      /* QEMU 7.2 MIN_REFCOUNT_CACHE_SIZE */
#define RC_CACHE_MIN_BLOCKS     2u
/* More slots than refcount-table entries can never be used. */
#define RC_CACHE_MAX_SLOTS      (QCOW2_MAX_REFTABLE_BYTES / 8u)

/* The engine sees the generic cache under its own type name. */
struct qcow2_refcount_cache {
    qcow2_table_cache *blocks;
};

uint64_t qcow2_default_refcount_cache_bytes(const qcow2_image *img)
{
    return (uint64_t)RC_CACHE_DEFAULT_BLOCKS * img->cluster_size;
}

static int cache_allowed(const qcow2_image *img)
{
    return !img->is_raw && !img->is_snapshot_view && img->cluster_size &&
           img->cluster_bits;
}

void qcow2_refcount_cache_free(qcow2_refcount_cache *cache)
{
    if (!cache)
        return;
    qcow2_table_cache_free(cache->blocks);
    free(cache);
}

/* A whole block, kept only when the file holds all of it: a block cut
 * short by the end of the file (or an error) is read straight from the
 * file instead, which gives the error the caller always got. */
static int read_block(void *ctx, uint64_t offset, void *block, size_t len)
{
    qcow2_image *img = ctx;
    int64_t n = img->io->ops->pread(img->io, block, len, offset);

    return n < 0 || (uint64_t)n < len ? QCOW2_TABLE_NOT_KEPT : 0;
}

static int report(void *ctx, int code, const char *msg)
{
    return qcow2_fail(ctx, code, "%s", msg);
}

/* A dirty block written back whole. */
static int write_block(void *ctx, uint64_t offset, const void *block,
                       size_t len)
{
    return qcow2_write_checked(ctx, OVERLAP_REFCOUNT_BLOCK, "refcount_block",
                               offset, block, len);
}

static int barrier(void *ctx)
{
    return qcow2_barrier(ctx);
}

/* The handle's write observer (img->write_observer): mirror a write of
 * the image file into the cached blocks it overlaps (ok), or forget them
 * (!ok: the disk is unknown). */
static void observe_write(void *ctx, uint64_t offset, const void *buf,
                          size_t length, int ok)
{
    qcow2_refcount_cache *cache = ctx;

    qcow2_table_cache_mirror(cache->blocks, offset, length, ok ? buf : NULL);
}

static int cache_new(qcow2_image *img, uint64_t bytes,
                     qcow2_refcount_cache **out)
{
    qcow2_table_cache_ops ops = { .ctx = img, .read = read_block,
                                  .write = write_block, .barrier = barrier,
                                  .fail = report };
    qcow2_refcount_cache *cache;
    uint64_t blocks;

    *out = NULL;
    if (bytes == 0)
        bytes = qcow2_default_refcount_cache_bytes(img);
    blocks = bytes / img->cluster_size;
    blocks = min_u64(max_u64(blocks, RC_CACHE_MIN_BLOCKS), RC_CACHE_MAX_SLOTS);
    cache = calloc(1, sizeof *cache);
    if (!cache || qcow2_table_cache_new((uint32_t)blocks, img->cluster_bits,
                                        "refcount block", &ops,
                                        &cache->blocks) < 0) {
        free(cache);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (refcount "
                          "cache)");
    }
    *out = cache;
    /* Registered for the cache's life: it lives as long as the handle. */
    img->write_observer = observe_write;
    img->write_observer_ctx = cache;
    return 0;
}

/* The handle's cache, created on first use (img->refcount_cache_bytes,
 * 0 = default); NULL without error where none is kept. */
static int cache_attach(qcow2_image *img, qcow2_table_cache **out)
{
    int rc = 0;

    *out = NULL;
    if (!cache_allowed(img))
        return 0;
    if (!img->refcount_cache)
        rc = cache_new(img, img->refcount_cache_bytes, &img->refcount_cache);
    if (img->refcount_cache)
        *out = img->refcount_cache->blocks;
    return rc;
}

static void forget_error(qcow2_image *img)
{
    img->err.code = 0;          /* no cache is not a failure */
    img->err.msg[0] = '\0';
}

int qcow2_refcount_block_read(qcow2_image *img, uint64_t block_offset,
                              uint64_t byte_start, void *buf, size_t len)
{
    qcow2_table_cache *cache;
    uint8_t *block;
    int rc;

    if (len == 0)
        return 0;
    rc = cache_attach(img, &cache);
    if (rc < 0)
        return rc;
    if (!cache || block_offset == 0 ||
        !is_aligned(block_offset, img->cluster_size) ||
        byte_start > img->cluster_size ||
        len > img->cluster_size - byte_start)
        goto direct;
    rc = qcow2_table_cache_get(cache, block_offset, &block);
    if (rc < 0)
        return rc;
    if (rc == QCOW2_TABLE_NOT_KEPT)
        goto direct;
    memcpy(buf, block + byte_start, len);
    return 0;
direct:
    return qcow2_read_meta(img, block_offset + byte_start, buf, len,
                           "refcount block");
}

void qcow2_refcount_cache_install(qcow2_image *img, uint64_t block_offset,
                                  const void *block)
{
    qcow2_table_cache *cache;

    if (cache_attach(img, &cache) < 0 || !cache ||
        qcow2_table_cache_install(cache, block_offset, block) < 0)
        forget_error(img);
}

void qcow2_refcount_cache_drop(qcow2_image *img, uint64_t block_offset)
{
    if (img->refcount_cache)
        qcow2_table_cache_drop(img->refcount_cache->blocks, block_offset);
}

void qcow2_refcount_cache_drop_all(qcow2_image *img)
{
    if (img && img->refcount_cache)
        qcow2_table_cache_drop_all(img->refcount_cache->blocks);
}

int qcow2_refcount_cache_patch(qcow2_image *img, uint64_t block_offset,
                               uint64_t byte_start, const void *bytes,
                               size_t len)
{
    uint8_t *block;

    if (!img->refcount_cache || byte_start > img->cluster_size ||
        len > img->cluster_size - byte_start)
        return 0;
    block = qcow2_table_cache_lookup(img->refcount_cache->blocks,
                                     block_offset);
    if (!block)
        return 0;
    memcpy(block + byte_start, bytes, len);
    qcow2_table_cache_mark_dirty(img->refcount_cache->blocks, block_offset);
    return 1;
}

qcow2_table_cache *qcow2_refcount_cache_blocks(const qcow2_image *img)
{
    return img->refcount_cache ? img->refcount_cache->blocks : NULL;
}
