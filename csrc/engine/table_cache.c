/*
 * The generic metadata-table cache (table_cache.h): slots in a fixed
 * array, a chained hash on the table's offset, a doubly linked LRU list
 * (free slots at its tail), dirty flags written back through a callback,
 * and QEMU's one-shot dependency between two caches.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../qcow2.h"
#include "table_cache.h"
#include "util.h"

#define NO_SLOT (-1)
/* Slot indexes are int32_t; the hash doubles the slot count. */
#define MAX_SLOTS (1u << 29)

typedef struct table_slot {
    uint64_t offset;            /* host offset of the table held */
    uint8_t *table;             /* table_bytes, NULL until first use */
    int32_t hash_next;          /* next slot in the same bucket */
    int32_t lru_prev, lru_next; /* towards most / least recently used */
    uint8_t used;               /* holds a valid table */
    uint8_t dirty;              /* newer than the disk */
} table_slot;

struct qcow2_table_cache {
    const char *name;
    qcow2_table_cache_ops ops;
    uint64_t table_bytes;
    uint32_t table_bits;
    uint32_t n_slots;
    uint32_t n_used;
    uint32_t n_buffers;
    uint32_t n_buckets;         /* a power of two */
    int32_t *buckets;           /* first slot of each chain */
    table_slot *slots;
    int32_t lru_head;           /* most recently used */
    int32_t lru_tail;           /* least recently used; free slots too */
    qcow2_table_cache *depends; /* flushed before our next write-back */
    uint64_t hits, misses, writebacks, evictions;
    uint32_t n_dirty;           /* slots with dirty set */
};

static void set_dirty(qcow2_table_cache *cache, table_slot *slot, int dirty)
{
    if (slot->dirty != (dirty != 0))
        cache->n_dirty += dirty ? 1u : (uint32_t)-1;
    slot->dirty = dirty != 0;
}

static int cache_fail(qcow2_table_cache *cache, int code, const char *what)
{
    char msg[160];

    snprintf(msg, sizeof msg, what, cache->name);
    return cache->ops.fail ? cache->ops.fail(cache->ops.ctx, code, msg)
                           : code;
}

int qcow2_table_cache_new(uint32_t n_slots, uint32_t table_bits,
                          const char *name, const qcow2_table_cache_ops *ops,
                          qcow2_table_cache **out)
{
    qcow2_table_cache *cache;
    uint32_t n = 8;

    *out = NULL;
    if (n_slots == 0 || n_slots > MAX_SLOTS || table_bits >= 32 ||
        !ops || !ops->read)
        return QCOW2_E_INVALID;
    cache = calloc(1, sizeof *cache);
    if (!cache)
        return QCOW2_E_NOMEM;
    cache->name = name ? name : "table";
    cache->ops = *ops;
    cache->table_bits = table_bits;
    cache->table_bytes = 1ull << table_bits;
    cache->n_slots = n_slots;
    while (n < n_slots * 2u)
        n <<= 1;
    cache->n_buckets = n;
    cache->buckets = malloc(cache->n_buckets * sizeof *cache->buckets);
    cache->slots = calloc(cache->n_slots, sizeof *cache->slots);
    if (!cache->buckets || !cache->slots) {
        qcow2_table_cache_free(cache);
        return QCOW2_E_NOMEM;
    }
    for (uint32_t i = 0; i < cache->n_buckets; i++)
        cache->buckets[i] = NO_SLOT;
    /* Every slot starts free, chained in index order. */
    for (uint32_t i = 0; i < cache->n_slots; i++) {
        cache->slots[i].hash_next = NO_SLOT;
        cache->slots[i].lru_prev = i ? (int32_t)i - 1 : NO_SLOT;
        cache->slots[i].lru_next =
            i + 1 < cache->n_slots ? (int32_t)i + 1 : NO_SLOT;
    }
    cache->lru_head = 0;
    cache->lru_tail = (int32_t)cache->n_slots - 1;
    *out = cache;
    return 0;
}

void qcow2_table_cache_free(qcow2_table_cache *cache)
{
    if (!cache)
        return;
    if (cache->slots) {
        for (uint32_t i = 0; i < cache->n_slots; i++)
            free(cache->slots[i].table);
    }
    free(cache->slots);
    free(cache->buckets);
    free(cache);
}

static uint32_t bucket_of(const qcow2_table_cache *cache, uint64_t offset)
{
    /* Fibonacci hashing of the table number spreads strided offsets. */
    uint64_t h = (offset >> cache->table_bits) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32) & (cache->n_buckets - 1);
}

static void lru_unlink(qcow2_table_cache *cache, int32_t index)
{
    table_slot *slot = &cache->slots[index];

    if (slot->lru_prev != NO_SLOT)
        cache->slots[slot->lru_prev].lru_next = slot->lru_next;
    else
        cache->lru_head = slot->lru_next;
    if (slot->lru_next != NO_SLOT)
        cache->slots[slot->lru_next].lru_prev = slot->lru_prev;
    else
        cache->lru_tail = slot->lru_prev;
    slot->lru_prev = slot->lru_next = NO_SLOT;
}

static void lru_push_head(qcow2_table_cache *cache, int32_t index)
{
    table_slot *slot = &cache->slots[index];

    slot->lru_prev = NO_SLOT;
    slot->lru_next = cache->lru_head;
    if (cache->lru_head != NO_SLOT)
        cache->slots[cache->lru_head].lru_prev = index;
    cache->lru_head = index;
    if (cache->lru_tail == NO_SLOT)
        cache->lru_tail = index;
}

static void lru_push_tail(qcow2_table_cache *cache, int32_t index)
{
    table_slot *slot = &cache->slots[index];

    slot->lru_next = NO_SLOT;
    slot->lru_prev = cache->lru_tail;
    if (cache->lru_tail != NO_SLOT)
        cache->slots[cache->lru_tail].lru_next = index;
    cache->lru_tail = index;
    if (cache->lru_head == NO_SLOT)
        cache->lru_head = index;
}

static void make_recent(qcow2_table_cache *cache, int32_t index)
{
    lru_unlink(cache, index);
    lru_push_head(cache, index);
}

static int32_t hash_find(const qcow2_table_cache *cache, uint64_t offset)
{
    int32_t index = cache->buckets[bucket_of(cache, offset)];

    while (index != NO_SLOT && cache->slots[index].offset != offset)
        index = cache->slots[index].hash_next;
    return index;
}

static void hash_insert(qcow2_table_cache *cache, int32_t index)
{
    uint32_t bucket = bucket_of(cache, cache->slots[index].offset);

    cache->slots[index].hash_next = cache->buckets[bucket];
    cache->buckets[bucket] = index;
}

static void hash_remove(qcow2_table_cache *cache, int32_t index)
{
    int32_t *link = &cache->buckets[bucket_of(cache,
                                              cache->slots[index].offset)];

    while (*link != NO_SLOT && *link != index)
        link = &cache->slots[*link].hash_next;
    if (*link == index)
        *link = cache->slots[index].hash_next;
    cache->slots[index].hash_next = NO_SLOT;
}

/* Empty the slot and make it the first candidate for reuse. */
static void slot_release(qcow2_table_cache *cache, int32_t index)
{
    table_slot *slot = &cache->slots[index];

    if (slot->used) {
        hash_remove(cache, index);
        cache->n_used--;
    }
    slot->used = 0;
    set_dirty(cache, slot, 0);
    lru_unlink(cache, index);
    lru_push_tail(cache, index);
}

static void slot_publish(qcow2_table_cache *cache, int32_t index,
                         uint64_t offset)
{
    cache->slots[index].offset = offset;
    cache->slots[index].used = 1;
    cache->n_used++;
    hash_insert(cache, index);
    make_recent(cache, index);
}

/* Flush the cache depended on; the dependency is then satisfied. */
static int flush_dependency(qcow2_table_cache *cache)
{
    int rc = qcow2_table_cache_flush(cache->depends);

    if (rc < 0)
        return rc;
    cache->depends = NULL;
    return 0;
}

/* Write one dirty entry back, after what the cache depends on. */
static int entry_write_back(qcow2_table_cache *cache, int32_t index)
{
    table_slot *slot = &cache->slots[index];
    int rc;

    if (!slot->used || !slot->dirty)
        return 0;
    if (!cache->ops.write)
        return cache_fail(cache, QCOW2_E_BUSY,
                          "%s cache: a dirty table and no write-back");
    if (cache->depends) {
        rc = flush_dependency(cache);
        if (rc < 0)
            return rc;
    }
    rc = cache->ops.write(cache->ops.ctx, slot->offset, slot->table,
                          (size_t)cache->table_bytes);
    if (rc < 0)
        return rc;      /* still dirty: the disk is older than the table */
    set_dirty(cache, slot, 0);
    cache->writebacks++;
    return 0;
}

/* The least recently used slot, emptied (written back first when dirty),
 * with its buffer allocated. Without write-back, dirty slots are passed
 * over. */
static int take_slot(qcow2_table_cache *cache, int32_t *out)
{
    int32_t index = cache->lru_tail;
    table_slot *slot;
    int rc;

    if (!cache->ops.write) {
        while (index != NO_SLOT && cache->slots[index].dirty)
            index = cache->slots[index].lru_prev;
        if (index == NO_SLOT)
            return cache_fail(cache, QCOW2_E_BUSY,
                              "%s cache: every table is dirty");
    }
    rc = entry_write_back(cache, index);
    if (rc < 0)
        return rc;
    if (cache->slots[index].used)
        cache->evictions++;
    slot_release(cache, index);
    slot = &cache->slots[index];
    if (!slot->table) {
        slot->table = malloc((size_t)cache->table_bytes);
        if (!slot->table)
            return cache_fail(cache, QCOW2_E_NOMEM, "out of memory (%s)");
        cache->n_buffers++;
    }
    *out = index;
    return 0;
}

int qcow2_table_cache_get(qcow2_table_cache *cache, uint64_t offset,
                          uint8_t **table)
{
    int32_t index = hash_find(cache, offset);
    int rc;

    *table = NULL;
    if (index != NO_SLOT) {
        cache->hits++;
        make_recent(cache, index);
        *table = cache->slots[index].table;
        return 0;
    }
    cache->misses++;
    rc = take_slot(cache, &index);
    if (rc < 0)
        return rc;
    rc = cache->ops.read(cache->ops.ctx, offset, cache->slots[index].table,
                         (size_t)cache->table_bytes);
    if (rc != 0)
        return rc;      /* the slot stays free */
    slot_publish(cache, index, offset);
    *table = cache->slots[index].table;
    return 0;
}

uint8_t *qcow2_table_cache_lookup(qcow2_table_cache *cache, uint64_t offset)
{
    int32_t index = hash_find(cache, offset);

    return index == NO_SLOT ? NULL : cache->slots[index].table;
}

int qcow2_table_cache_install(qcow2_table_cache *cache, uint64_t offset,
                              const void *table)
{
    int32_t index = hash_find(cache, offset);
    int rc;

    if (index == NO_SLOT) {
        rc = take_slot(cache, &index);
        if (rc < 0)
            return rc;
        memcpy(cache->slots[index].table, table, (size_t)cache->table_bytes);
        slot_publish(cache, index, offset);
        return 0;
    }
    if (cache->slots[index].table != table)
        memcpy(cache->slots[index].table, table, (size_t)cache->table_bytes);
    set_dirty(cache, &cache->slots[index], 0);
    make_recent(cache, index);
    return 0;
}

void qcow2_table_cache_mark_dirty(qcow2_table_cache *cache, uint64_t offset)
{
    int32_t index = hash_find(cache, offset);

    if (index != NO_SLOT)
        set_dirty(cache, &cache->slots[index], 1);
}

void qcow2_table_cache_mark_clean(qcow2_table_cache *cache, uint64_t offset)
{
    int32_t index = hash_find(cache, offset);

    if (index != NO_SLOT)
        set_dirty(cache, &cache->slots[index], 0);
}

/* Copy the part of [offset, offset+length) that falls in the slot's table
 * from buf, or (buf NULL) forget the table unless it is dirty. A write
 * back of the slot's own buffer has nothing to copy. */
static void mirror_slot(qcow2_table_cache *cache, int32_t index,
                        uint64_t offset, uint64_t length, const uint8_t *buf)
{
    table_slot *slot = &cache->slots[index];
    uint64_t start, end;

    if (!buf) {
        if (!slot->dirty)
            slot_release(cache, index);
        return;
    }
    start = max_u64(offset, slot->offset);
    end = min_u64(offset + length, slot->offset + cache->table_bytes);
    if (slot->table + (start - slot->offset) != buf + (start - offset))
        memcpy(slot->table + (start - slot->offset), buf + (start - offset),
               (size_t)(end - start));
}

void qcow2_table_cache_mirror(qcow2_table_cache *cache, uint64_t offset,
                              uint64_t length, const void *buf)
{
    uint64_t first, last;

    if (!cache || cache->n_used == 0 || length == 0 ||
        !range_inside(offset, length, UINT64_MAX))
        return;
    first = offset >> cache->table_bits;
    last = (offset + length - 1) >> cache->table_bits;
    /* By lookup of each table-sized step of the range, or by a scan of
     * the slots when that is shorter. */
    if (last - first + 1 <= cache->n_slots) {
        for (uint64_t t = first; t <= last; t++) {
            int32_t index = hash_find(cache, t << cache->table_bits);
            if (index != NO_SLOT)
                mirror_slot(cache, index, offset, length, buf);
        }
        return;
    }
    for (uint32_t i = 0; i < cache->n_slots; i++) {
        table_slot *slot = &cache->slots[i];
        if (slot->used && ranges_overlap(slot->offset, cache->table_bytes,
                                         offset, length))
            mirror_slot(cache, (int32_t)i, offset, length, buf);
    }
}

void qcow2_table_cache_drop(qcow2_table_cache *cache, uint64_t offset)
{
    int32_t index;

    if (!cache)
        return;
    index = hash_find(cache, offset);
    if (index != NO_SLOT)
        slot_release(cache, index);
}

void qcow2_table_cache_drop_all(qcow2_table_cache *cache)
{
    if (!cache)
        return;
    for (uint32_t i = 0; i < cache->n_slots; i++) {
        if (cache->slots[i].used)
            slot_release(cache, (int32_t)i);
    }
}

int qcow2_table_cache_flush(qcow2_table_cache *cache)
{
    uint64_t written = cache->writebacks;
    int result = 0, rc;

    if (cache->depends) {
        rc = flush_dependency(cache);
        if (rc < 0)
            return rc;
    }
    /* Keep going past a failure: the rest may still reach the disk. */
    for (uint32_t i = 0; i < cache->n_slots; i++) {
        rc = entry_write_back(cache, (int32_t)i);
        if (rc < 0 && result == 0)
            result = rc;
    }
    if (cache->writebacks != written && cache->ops.barrier) {
        rc = cache->ops.barrier(cache->ops.ctx);
        if (rc < 0 && result == 0)
            result = rc;
    }
    return result;
}

int qcow2_table_cache_set_dependency(qcow2_table_cache *cache,
                                     qcow2_table_cache *dependency)
{
    int rc;

    if (cache == dependency)
        return QCOW2_E_INVALID;
    /* No chains: what the dependency waits for goes to the disk now. */
    if (dependency->depends) {
        rc = flush_dependency(dependency);
        if (rc < 0)
            return rc;
    }
    if (cache->depends && cache->depends != dependency) {
        rc = flush_dependency(cache);
        if (rc < 0)
            return rc;
    }
    cache->depends = dependency;
    return 0;
}

void qcow2_table_cache_get_stats(const qcow2_table_cache *cache,
                                 qcow2_table_cache_stats *out)
{
    memset(out, 0, sizeof *out);
    out->hits = cache->hits;
    out->misses = cache->misses;
    out->writebacks = cache->writebacks;
    out->evictions = cache->evictions;
    out->n_slots = cache->n_slots;
    out->n_used = cache->n_used;
    out->n_buffers = cache->n_buffers;
    out->n_dirty = cache->n_dirty;
}
