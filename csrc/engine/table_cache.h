/*
 * One generic cache of metadata tables (issue 9, layer 4): whole tables of
 * one size (a cluster: L2 tables, refcount blocks), kept byte for byte as
 * on disk, found by host offset through a chained hash and evicted least
 * recently used first. It knows nothing of images: reading, writing back
 * and barriers are callbacks, so it serves any table kind and is unit
 * tested with a fake backend (csrc/test/table_cache_test.c).
 *
 * Bounded memory: a fixed number of slots; a slot's table buffer is
 * allocated the first time the slot is used, never more than one each.
 *
 * Dirty entries and dependencies (QEMU's qcow2-cache.c): an entry marked
 * dirty is newer than the disk. Evicting it, or flushing the cache, writes
 * it back through ops.write; when the cache depends on another (its tables
 * point at clusters whose refcounts sit dirty in the other), the other is
 * flushed first, with a barrier, before any of this cache's entries is
 * written. Without ops.write (write-through mode) a dirty entry is never
 * evicted; callers that write through mark the entry clean themselves.
 */
#ifndef QCOW2_TABLE_CACHE_H
#define QCOW2_TABLE_CACHE_H

#include <stddef.h>
#include <stdint.h>

typedef struct qcow2_table_cache qcow2_table_cache;

/* A read callback's "fine, but do not keep it" answer (> 0, not an
 * error): the slot stays free and qcow2_table_cache_get returns it. */
#define QCOW2_TABLE_NOT_KEPT 1

typedef struct qcow2_table_cache_ops {
    void *ctx;                  /* passed to every callback */
    /* Fill table (len bytes) with the table at offset: 0, a negative
     * status (the callee reports it), or QCOW2_TABLE_NOT_KEPT. */
    int (*read)(void *ctx, uint64_t offset, void *table, size_t len);
    /* Write a dirty table back: 0 or a negative status. NULL: no
     * write-back (dirty entries stay until marked clean). */
    int (*write)(void *ctx, uint64_t offset, const void *table, size_t len);
    /* Order every write so far before every later one (a flush). */
    int (*barrier)(void *ctx);
    /* Report the cache's own failure (msg is one line); returns code. */
    int (*fail)(void *ctx, int code, const char *msg);
} qcow2_table_cache_ops;

typedef struct qcow2_table_cache_stats {
    uint64_t hits, misses;      /* qcow2_table_cache_get lookups */
    uint64_t writebacks;        /* tables written through ops.write */
    uint64_t evictions;         /* tables pushed out to make room */
    uint32_t n_slots;           /* the bound */
    uint32_t n_used;            /* slots holding a table */
    uint32_t n_buffers;         /* table buffers allocated (<= n_slots) */
    uint32_t n_dirty;
} qcow2_table_cache_stats;

/* A cache of n_slots (at least 1) tables of 1 << table_bits bytes each.
 * name ("L2 table") is for messages. 0, QCOW2_E_INVALID or
 * QCOW2_E_NOMEM (nothing reported: the caller does). */
int qcow2_table_cache_new(uint32_t n_slots, uint32_t table_bits,
                          const char *name, const qcow2_table_cache_ops *ops,
                          qcow2_table_cache **out);
/* Frees without writing anything back. NULL: nothing to do. */
void qcow2_table_cache_free(qcow2_table_cache *cache);

/* The table at offset: a hit, or read through ops.read into the least
 * recently used slot (written back first when dirty). *table is valid
 * until the next call on the cache. 0, a negative status (an empty slot,
 * the old table forgotten) or QCOW2_TABLE_NOT_KEPT (*table NULL). */
int qcow2_table_cache_get(qcow2_table_cache *cache, uint64_t offset,
                          uint8_t **table);
/* The cached table at offset or NULL; no read, no change of LRU order. */
uint8_t *qcow2_table_cache_lookup(qcow2_table_cache *cache, uint64_t offset);
/* Keep a copy of the whole table at offset (just written, or about to be
 * read), most recently used, clean. 0 or a negative status. */
int qcow2_table_cache_install(qcow2_table_cache *cache, uint64_t offset,
                              const void *table);

/* The cached table at offset (if any) is newer than the disk / is not. */
void qcow2_table_cache_mark_dirty(qcow2_table_cache *cache, uint64_t offset);
void qcow2_table_cache_mark_clean(qcow2_table_cache *cache, uint64_t offset);

/* The bytes [offset, offset+length) of the file now hold buf: copy them
 * into every cached table they overlap. buf NULL (the bytes are unknown,
 * a write failed): forget the clean tables they overlap (a dirty one still
 * holds what belongs there). */
void qcow2_table_cache_mirror(qcow2_table_cache *cache, uint64_t offset,
                              uint64_t length, const void *buf);
/* Forget one table or every table, dirty or not. */
void qcow2_table_cache_drop(qcow2_table_cache *cache, uint64_t offset);
void qcow2_table_cache_drop_all(qcow2_table_cache *cache);

/* Write every dirty entry back (the dependency first), then a barrier if
 * anything was written. On failure the entries not written stay dirty. */
int qcow2_table_cache_flush(qcow2_table_cache *cache);
/* cache's dirty tables must not reach the disk before dependency's (as
 * QEMU's qcow2_cache_set_dependency): until cache next writes back, it
 * flushes dependency first. A different earlier dependency is flushed now.
 * 0 or a negative status. */
int qcow2_table_cache_set_dependency(qcow2_table_cache *cache,
                                     qcow2_table_cache *dependency);

void qcow2_table_cache_get_stats(const qcow2_table_cache *cache,
                                 qcow2_table_cache_stats *out);

#endif /* QCOW2_TABLE_CACHE_H */
