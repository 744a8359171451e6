/*
 * Bounded L2-table cache, one per image handle.
 *
 * A fixed array of slots, each holding one L2 table (one cluster, kept
 * big-endian exactly as on disk), found by the table's host offset
 * through a chained hash, evicted least-recently-used first. Tables are
 * allocated the first time their slot is used, so a large cache limit on
 * a small image costs nothing.
 *
 * Room for the write engine: a slot carries a dirty flag; eviction never
 * picks a dirty slot, so a writer that marks tables dirty keeps them until
 * it has written them (after the refcount blocks they depend on) and
 * cleared the flag.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* QEMU 7.2: DEFAULT_L2_CACHE_MAX_SIZE and MIN_L2_CACHE_SIZE (tables). */
#define L2_CACHE_DEFAULT_MAX    (32ull * 1024 * 1024)
#define L2_CACHE_MIN_TABLES     2u
/* More slots than L1 entries can never be used (QCOW2_MAX_L1_BYTES / 8). */
#define L2_CACHE_MAX_SLOTS      (QCOW2_MAX_L1_BYTES / 8u)

#define NO_SLOT                 (-1)

typedef struct l2_slot {
    uint64_t l2_offset;         /* host offset of the table held */
    uint8_t *table;             /* table_bytes, NULL until first use */
    int32_t hash_next;          /* next slot in the same bucket */
    int32_t lru_prev, lru_next; /* towards most / least recently used */
    uint8_t used;               /* holds a valid table */
    uint8_t dirty;              /* write engine: newer than the disk */
} l2_slot;

struct qcow2_l2_cache {
    uint64_t table_bytes;       /* the image's cluster size */
    uint32_t cluster_bits;
    uint32_t n_slots;
    uint32_t n_buckets;         /* a power of two */
    int32_t *buckets;           /* first slot of each chain */
    l2_slot *slots;
    int32_t lru_head;           /* most recently used */
    int32_t lru_tail;           /* least recently used; free slots too */
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

static uint32_t bucket_count(uint32_t n_slots)
{
    uint32_t n = 8;
    while (n < n_slots * 2u)
        n <<= 1;
    return n;
}

static uint32_t bucket_of(const qcow2_l2_cache *cache, uint64_t l2_offset)
{
    /* Fibonacci hashing of the cluster number spreads strided offsets. */
    uint64_t h = (l2_offset >> cache->cluster_bits) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32) & (cache->n_buckets - 1);
}

int qcow2_l2_cache_new(qcow2_image *img, uint64_t bytes,
                       qcow2_l2_cache **out)
{
    qcow2_l2_cache *cache;

    *out = NULL;
    if (img->cluster_size == 0 || img->cluster_bits == 0)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "L2 cache: cluster size not known yet");
    if (bytes == 0)
        bytes = qcow2_default_l2_cache_bytes(img);
    cache = calloc(1, sizeof *cache);
    if (!cache)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (L2 cache)");
    cache->table_bytes = img->cluster_size;
    cache->cluster_bits = img->cluster_bits;
    cache->n_slots = slot_count(img, bytes);
    cache->n_buckets = bucket_count(cache->n_slots);
    cache->buckets = malloc(cache->n_buckets * sizeof *cache->buckets);
    cache->slots = calloc(cache->n_slots, sizeof *cache->slots);
    if (!cache->buckets || !cache->slots) {
        qcow2_l2_cache_free(cache);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (L2 cache)");
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

void qcow2_l2_cache_free(qcow2_l2_cache *cache)
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

static void lru_unlink(qcow2_l2_cache *cache, int32_t index)
{
    l2_slot *slot = &cache->slots[index];

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

static void lru_push_head(qcow2_l2_cache *cache, int32_t index)
{
    l2_slot *slot = &cache->slots[index];

    slot->lru_prev = NO_SLOT;
    slot->lru_next = cache->lru_head;
    if (cache->lru_head != NO_SLOT)
        cache->slots[cache->lru_head].lru_prev = index;
    cache->lru_head = index;
    if (cache->lru_tail == NO_SLOT)
        cache->lru_tail = index;
}

static void lru_push_tail(qcow2_l2_cache *cache, int32_t index)
{
    l2_slot *slot = &cache->slots[index];

    slot->lru_next = NO_SLOT;
    slot->lru_prev = cache->lru_tail;
    if (cache->lru_tail != NO_SLOT)
        cache->slots[cache->lru_tail].lru_next = index;
    cache->lru_tail = index;
    if (cache->lru_head == NO_SLOT)
        cache->lru_head = index;
}

static int32_t hash_find(const qcow2_l2_cache *cache, uint64_t l2_offset)
{
    int32_t index = cache->buckets[bucket_of(cache, l2_offset)];

    while (index != NO_SLOT && cache->slots[index].l2_offset != l2_offset)
        index = cache->slots[index].hash_next;
    return index;
}

static void hash_insert(qcow2_l2_cache *cache, int32_t index)
{
    uint32_t bucket = bucket_of(cache, cache->slots[index].l2_offset);

    cache->slots[index].hash_next = cache->buckets[bucket];
    cache->buckets[bucket] = index;
}

static void hash_remove(qcow2_l2_cache *cache, int32_t index)
{
    int32_t *link = &cache->buckets[bucket_of(cache,
                                              cache->slots[index].l2_offset)];

    while (*link != NO_SLOT && *link != index)
        link = &cache->slots[*link].hash_next;
    if (*link == index)
        *link = cache->slots[index].hash_next;
    cache->slots[index].hash_next = NO_SLOT;
}

/* Empty the slot and make it the first candidate for reuse. */
static void slot_release(qcow2_l2_cache *cache, int32_t index)
{
    if (cache->slots[index].used)
        hash_remove(cache, index);
    cache->slots[index].used = 0;
    cache->slots[index].dirty = 0;
    lru_unlink(cache, index);
    lru_push_tail(cache, index);
}

/* The least recently used slot that may be dropped: free or clean. */
static int32_t pick_victim(const qcow2_l2_cache *cache)
{
    int32_t index = cache->lru_tail;

    while (index != NO_SLOT && cache->slots[index].dirty)
        index = cache->slots[index].lru_prev;
    return index;
}

static int cache_attach(qcow2_image *img)
{
    if (img->l2_cache)
        return 0;
    return qcow2_l2_cache_new(img, img->l2_cache_bytes, &img->l2_cache);
}

int qcow2_l2_cache_get(qcow2_image *img, uint64_t l2_offset,
                       uint8_t **table)
{
    qcow2_l2_cache *cache;
    l2_slot *slot;
    int32_t index;
    int rc;

    *table = NULL;
    rc = cache_attach(img);
    if (rc < 0)
        return rc;
    cache = img->l2_cache;
    index = hash_find(cache, l2_offset);
    if (index != NO_SLOT) {
        lru_unlink(cache, index);
        lru_push_head(cache, index);
        *table = cache->slots[index].table;
        return 0;
    }

    index = pick_victim(cache);
    if (index == NO_SLOT)
        return qcow2_fail(img, QCOW2_E_BUSY,
                          "L2 cache: every table is dirty");
    slot_release(cache, index);
    slot = &cache->slots[index];
    if (!slot->table) {
        slot->table = malloc(cache->table_bytes);
        if (!slot->table)
            return qcow2_fail(img, QCOW2_E_NOMEM,
                              "out of memory (L2 table)");
    }
    rc = qcow2_read_meta(img, l2_offset, slot->table,
                         (size_t)cache->table_bytes, "L2 table");
    if (rc < 0)
        return rc;      /* the slot stays free */
    slot->l2_offset = l2_offset;
    slot->used = 1;
    hash_insert(cache, index);
    lru_unlink(cache, index);
    lru_push_head(cache, index);
    *table = slot->table;
    return 0;
}

void qcow2_l2_cache_drop(qcow2_l2_cache *cache, uint64_t l2_offset)
{
    int32_t index;

    if (!cache)
        return;
    index = hash_find(cache, l2_offset);
    if (index != NO_SLOT)
        slot_release(cache, index);
}

void qcow2_l2_cache_drop_all(qcow2_l2_cache *cache)
{
    if (!cache)
        return;
    for (uint32_t i = 0; i < cache->n_slots; i++) {
        if (cache->slots[i].used)
            slot_release(cache, (int32_t)i);
    }
}

/* Added for the write engine (write.c): write-through of an L2 update, so
 * the next lookup need not read the table again. */
void qcow2_l2_cache_update(qcow2_l2_cache *cache, uint64_t l2_offset,
                           uint64_t offset, const void *bytes, size_t length)
{
    int32_t index;

    if (!cache || offset > cache->table_bytes ||
        length > cache->table_bytes - offset)
        return;
    index = hash_find(cache, l2_offset);
    if (index != NO_SLOT)
        memcpy(cache->slots[index].table + offset, bytes, length);
}
