/*
 * Caches (layer 4): the L2-table cache and the refcount-block cache, both
 * over the generic metadata-table cache (table_cache.h).
 */
#ifndef QCOW2_CACHE_H
#define QCOW2_CACHE_H

#include "format.h"

/* ---- L2-table cache (l2_cache.c) ---------------------------------------- */
/* An L2 table cache holding at most `bytes` of tables (at least 2). */
int qcow2_l2_cache_new(qcow2_image *img, uint64_t bytes,
                       qcow2_l2_cache **out);
void qcow2_l2_cache_free(qcow2_l2_cache *cache);

/* Default L2 cache bytes for img: enough to map the whole disk, capped at
 * 32 MiB as QEMU 7.2 caps it, at least 2 tables. */
uint64_t qcow2_default_l2_cache_bytes(const qcow2_image *img);

/* The L2 table at host offset l2_offset: one whole cluster, big-endian as
 * on disk, from img->l2_cache or read with qcow2_read_meta on a miss. The
 * pointer is valid until the next call on the cache. img->l2_cache is
 * created on first use when the open path did not (img->l2_cache_bytes,
 * or the default). The caller validated l2_offset (aligned, inside the
 * file, not cluster 0). */
int qcow2_l2_cache_get(qcow2_image *img, uint64_t l2_offset,
                       uint8_t **table);
/* Forget the cached copy of one table (rewritten behind the cache's
 * back) or of every table. NULL cache: nothing to do. */
void qcow2_l2_cache_drop(qcow2_l2_cache *cache, uint64_t l2_offset);
void qcow2_l2_cache_drop_all(qcow2_l2_cache *cache);

/* The write engine changes `length` bytes at byte `offset` of the L2
 * table at l2_offset: the cached copy (if any) gets them and is marked
 * dirty. Write-through: once the bytes are on disk the writer marks it
 * clean. NULL cache: nothing to do. */
void qcow2_l2_cache_update(qcow2_l2_cache *cache, uint64_t l2_offset,
                           uint64_t offset, const void *bytes,
                           size_t length);
void qcow2_l2_cache_mark_clean(qcow2_l2_cache *cache, uint64_t l2_offset);
/* Write-back: `length` bytes at byte `first` of the table at l2_offset
 * changed to table[first..]: copied into the cached table (read again if
 * it was evicted), which stays dirty (the cache created on first use). 0
 * or a negative status (an eviction's write-back or the read failed;
 * nothing kept). */
int qcow2_l2_cache_store(qcow2_image *img, uint64_t l2_offset,
                         const uint8_t *table, uint64_t first, size_t length);

/* ---- Refcount-block cache (refcount_cache.c) -------------------------
 * Clean cached blocks hold the bytes on disk; writers keep it so through
 * qcow2_write_checked (overlap.h), whose write observer the cache
 * registers. A handle that defers refcounts patches blocks dirty
 * (qcow2_refcount_cache_patch); cache_flush.c writes them back before the
 * L2 tables that depend on them. */
/* Bytes [byte_start, byte_start+len) of the refcount block at
 * block_offset: from the cache (the whole block read once on a miss), or
 * straight from the file (views, raw images, blocks cut short by the end
 * of the file). Errors as qcow2_read_meta's ("refcount block"). */
int qcow2_refcount_block_read(qcow2_image *img, uint64_t block_offset,
                              uint64_t byte_start, void *buf, size_t len);
void qcow2_refcount_cache_free(qcow2_refcount_cache *cache);
/* QEMU 7.2's default: 4 clusters. */
uint64_t qcow2_default_refcount_cache_bytes(const qcow2_image *img);

/* A whole block just written (cluster_size bytes): keep it, saving the
 * read that would follow. Best effort. */
void qcow2_refcount_cache_install(qcow2_image *img, uint64_t block_offset,
                                  const void *block);
/* Forget one block / every block: after writes that bypass
 * qcow2_write_checked (raw writes) or a refcount-table switch. */
void qcow2_refcount_cache_drop(qcow2_image *img, uint64_t block_offset);
void qcow2_refcount_cache_drop_all(qcow2_image *img);
/* Deferred update: bytes [byte_start, byte_start+len) of the cached block
 * at block_offset become `bytes`, the block dirty. 1 when done, 0 when the
 * block is not cached (the caller writes through). */
int qcow2_refcount_cache_patch(qcow2_image *img, uint64_t block_offset,
                               uint64_t byte_start, const void *bytes,
                               size_t len);

/* ---- Both caches, in order (cache_flush.c) ---------------------------
 * The generic caches under the two front-ends (NULL until first use). */
struct qcow2_table_cache *qcow2_l2_cache_tables(const qcow2_image *img);
struct qcow2_table_cache *qcow2_refcount_cache_blocks(const qcow2_image *img);

/* Dirty tables of either cache (0 when none, or no write state). */
int qcow2_meta_dirty(const qcow2_image *img);
/* Does this handle keep L2 tables / refcount blocks dirty right now? */
int qcow2_meta_defer_l2(const qcow2_image *img);
int qcow2_meta_defer_refcounts(const qcow2_image *img);
/* An L2 table was stored dirty after refcount increases it needs: unless
 * refcounts are lazy, no L2 table is written back before the refcount
 * blocks (QEMU's qcow2_cache_set_dependency). */
int qcow2_meta_l2_after_refcounts(qcow2_image *img);
/* Write back every dirty refcount block, then every dirty L2 table (a
 * barrier before the tables when data was written, and after each group
 * written). 0 with nothing to do. */
int qcow2_meta_flush_refcounts(qcow2_image *img);
int qcow2_meta_flush_l2(qcow2_image *img);
int qcow2_meta_flush(qcow2_image *img);
/* An operation that reads or rewrites metadata behind the caches: the
 * caches are flushed, and until the matching release the handle writes
 * through (holds nest). No write state: nothing to do. */
int qcow2_meta_hold(qcow2_image *img);
void qcow2_meta_release(qcow2_image *img);
/* The body of a public operation that works behind the caches: `call`
 * (an int expression) between a hold and its release. */
#define QCOW2_HELD(img, call)                                           \
    do {                                                                \
        int held_rc_ = qcow2_meta_hold(img);                            \
        if (held_rc_ < 0)                                               \
            return held_rc_;                                            \
        held_rc_ = (call);                                              \
        qcow2_meta_release(img);                                        \
        return held_rc_;                                                \
    } while (0)

#endif /* QCOW2_CACHE_H */
