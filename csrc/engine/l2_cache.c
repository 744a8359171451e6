/*
 * The L2-table cache of an image handle: the generic table cache
 * (table_cache.c) with QEMU's sizing, reading tables with qcow2_read_meta.
 *
 * Write-through (cache "writethrough", or an operation holding the
 * caches): the write engine marks a table dirty when it changes it
 * (qcow2_l2_cache_update), writes the changed entries itself and marks
 * the table clean. Write-back: the engine stores the changed table
 * (qcow2_l2_cache_store) and it stays dirty until a flush or an eviction
 * writes it whole; a barrier first when guest data was written since the
 * last one, so that no entry reaches the disk before its data.
 */
#include <stdlib.h>
#include <string.h>

#include "cache.h"
#include "table_cache.h"

/* QEMU 7.2: DEFAULT_L2_CACHE_MAX_SIZE and MIN_L2_CACHE_SIZE (tables). */
#define L2_CACHE_DEFAULT_MAX    (32ull * 1024 * 1024)
#define L2_CACHE_MIN_TABLES     2u
/* More slots than L1 entries can never be used (QCOW2_MAX_L1_BYTES / 8). */
#define L2_CACHE_MAX_SLOTS      (QCOW2_MAX_L1_BYTES / 8u)

/* The engine sees the generic cache under its own type name. */
struct qcow2_l2_cache {
    qcow2_table_cache *tables;
    uint64_t table_bytes;       /* the image's cluster size */
};

uint64_t qcow2_default_l2_cache_bytes(const qcow2_image *img)
{
    uint64_t min_bytes = (uint64_t)L2_CACHE_MIN_TABLES * img->cluster_size;
    uint64_t entries, bytes;

    if (img->cluster_size == 0)
        return 0;
    /* Enough tables to map the whole disk (QEMU's max_l2_cache). */
    entries = div_round_up(img->size, img->cluster_size);
    if (mul_overflows(entries, img->l2_entry_bytes, &bytes))
        bytes = L2_CACHE_DEFAULT_MAX;
    bytes = align_up(min_u64(bytes, L2_CACHE_DEFAULT_MAX), img->cluster_size);
    bytes = min_u64(bytes, L2_CACHE_DEFAULT_MAX);
    return max_u64(bytes, min_bytes);
}

/* Slots worth having: never more than the tables the image can use. */
static uint32_t slot_count(const qcow2_image *img, uint64_t bytes)
{
    uint64_t tables = bytes / img->cluster_size;
    uint64_t coverage = (uint64_t)img->cluster_size * img->l2_entries;
    uint64_t useful = max_u64(img->l1_size,
                              coverage ? div_round_up(img->size, coverage) : 0);

    tables = min_u64(tables, max_u64(useful, L2_CACHE_MIN_TABLES));
    tables = min_u64(tables, L2_CACHE_MAX_SLOTS);
    return (uint32_t)max_u64(tables, L2_CACHE_MIN_TABLES);
}

static int read_table(void *ctx, uint64_t offset, void *table, size_t len)
{
    return qcow2_read_meta(ctx, offset, table, len, "L2 table");
}

static int report(void *ctx, int code, const char *msg)
{
    return qcow2_fail(ctx, code, "%s", msg);
}

/* A dirty table written back whole: data before the entries. */
static int write_table(void *ctx, uint64_t offset, const void *table,
                       size_t len)
{
    qcow2_image *img = ctx;
    int rc = 0;

    if (img->ws && img->ws->data_unsynced)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2, "l2", offset, table,
                                 len);
    return rc;
}

static int barrier(void *ctx)
{
    return qcow2_barrier(ctx);
}

int qcow2_l2_cache_new(qcow2_image *img, uint64_t bytes,
                       qcow2_l2_cache **out)
{
    qcow2_table_cache_ops ops = { .ctx = img, .read = read_table,
                                  .write = write_table, .barrier = barrier,
                                  .fail = report };
    qcow2_l2_cache *cache;

    *out = NULL;
    if (img->cluster_size == 0 || img->cluster_bits == 0)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "L2 cache: cluster size not known yet");
    if (bytes == 0)
        bytes = qcow2_default_l2_cache_bytes(img);
    cache = calloc(1, sizeof *cache);
    if (!cache || qcow2_table_cache_new(slot_count(img, bytes),
                                        img->cluster_bits, "L2 table", &ops,
                                        &cache->tables) < 0) {
        free(cache);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (L2 cache)");
    }
    cache->table_bytes = img->cluster_size;
    *out = cache;
    return 0;
}

void qcow2_l2_cache_free(qcow2_l2_cache *cache)
{
    if (!cache)
        return;
    qcow2_table_cache_free(cache->tables);
    free(cache);
}

int qcow2_l2_cache_get(qcow2_image *img, uint64_t l2_offset,
                       uint8_t **table)
{
    int rc;

    *table = NULL;
    if (!img->l2_cache) {
        rc = qcow2_l2_cache_new(img, img->l2_cache_bytes, &img->l2_cache);
        if (rc < 0)
            return rc;
    }
    return qcow2_table_cache_get(img->l2_cache->tables, l2_offset, table);
}

void qcow2_l2_cache_drop(qcow2_l2_cache *cache, uint64_t l2_offset)
{
    if (cache)
        qcow2_table_cache_drop(cache->tables, l2_offset);
}

void qcow2_l2_cache_drop_all(qcow2_l2_cache *cache)
{
    if (cache)
        qcow2_table_cache_drop_all(cache->tables);
}

void qcow2_l2_cache_update(qcow2_l2_cache *cache, uint64_t l2_offset,
                           uint64_t offset, const void *bytes, size_t length)
{
    uint8_t *table;

    if (!cache || offset > cache->table_bytes ||
        length > cache->table_bytes - offset)
        return;
    table = qcow2_table_cache_lookup(cache->tables, l2_offset);
    if (!table)
        return;
    memcpy(table + offset, bytes, length);
    qcow2_table_cache_mark_dirty(cache->tables, l2_offset);
}

void qcow2_l2_cache_mark_clean(qcow2_l2_cache *cache, uint64_t l2_offset)
{
    if (cache)
        qcow2_table_cache_mark_clean(cache->tables, l2_offset);
}

int qcow2_l2_cache_store(qcow2_image *img, uint64_t l2_offset,
                         const uint8_t *table, uint64_t first, size_t length)
{
    uint8_t *cached;
    int rc;

    if (!img->l2_cache) {
        rc = qcow2_l2_cache_new(img, img->l2_cache_bytes, &img->l2_cache);
        if (rc < 0)
            return rc;
    }
    if (first > img->cluster_size || length > img->cluster_size - first)
        return qcow2_fail(img, QCOW2_E_INVALID, "L2 cache: change past the "
                          "table");
    /* Only the changed bytes are new (the rest of `table` may not even
     * be a copy); a table evicted meanwhile was written back, so reading
     * it again gives the rest. */
    rc = qcow2_table_cache_get(img->l2_cache->tables, l2_offset, &cached);
    if (rc < 0)
        return rc;
    if (!cached)
        return qcow2_fail(img, QCOW2_E_IO, "L2 table at 0x%llx could not be "
                          "cached", (unsigned long long)l2_offset);
    memcpy(cached + first, table + first, length);
    qcow2_table_cache_mark_dirty(img->l2_cache->tables, l2_offset);
    return 0;
}

qcow2_table_cache *qcow2_l2_cache_tables(const qcow2_image *img)
{
    return img->l2_cache ? img->l2_cache->tables : NULL;
}
