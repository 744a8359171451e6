/*
 * Bounded refcount-block cache, one per image handle (issue: "Bounded L2
 * and refcount-block caches (sizes from the open options) that flush
 * refcount blocks before the L2 tables that depend on them").
 *
 * Whole refcount blocks (one cluster each, big-endian/packed exactly as on
 * disk) found by host offset through a chained hash, evicted least
 * recently used first; block buffers are allocated the first time their
 * slot is used. Same shape as the L2 cache (cache.c).
 *
 * WRITE-THROUGH, never write-back: the cache only saves reads. The
 * invariant is "a cached block holds exactly the bytes on disk at its
 * offset", kept at the one write funnel: qcow2_write_checked mirrors every
 * successful write of the image file into the cached blocks it overlaps
 * (whoever wrote it: refcount updates, new blocks, repair, amend, guest
 * data landing on a cluster that used to be a block) and drops them when a
 * write fails (the disk is then unknown). Writes that bypass the funnel
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

#include "write.h"

#define RC_CACHE_DEFAULT_BLOCKS 4u      /* QEMU 7.2 MIN_REFCOUNT_CACHE_SIZE */
#define RC_CACHE_MIN_BLOCKS     2u
/* More slots than refcount-table entries can never be used. */
#define RC_CACHE_MAX_SLOTS      (QCOW2_MAX_REFTABLE_BYTES / 8u)

#define NO_SLOT                 (-1)

typedef struct rc_slot {
    uint64_t offset;            /* host offset of the block held */
    uint8_t *block;             /* block_bytes, NULL until first use */
    int32_t hash_next;          /* next slot in the same bucket */
    int32_t lru_prev, lru_next; /* towards most / least recently used */
    uint8_t used;               /* holds a valid block */
} rc_slot;

struct qcow2_refcount_cache {
    uint64_t block_bytes;       /* the image's cluster size */
    uint32_t cluster_bits;
    uint32_t n_slots;
    uint32_t n_used;
    uint32_t n_buckets;         /* a power of two */
    int32_t *buckets;
    rc_slot *slots;
    int32_t lru_head;           /* most recently used */
    int32_t lru_tail;           /* least recently used; free slots too */
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

static uint32_t bucket_of(const qcow2_refcount_cache *cache, uint64_t offset)
{
    uint64_t h = (offset >> cache->cluster_bits) * 0x9E3779B97F4A7C15ull;
    return (uint32_t)(h >> 32) & (cache->n_buckets - 1);
}

void qcow2_refcount_cache_free(qcow2_refcount_cache *cache)
{
    if (!cache)
        return;
    if (cache->slots) {
        for (uint32_t i = 0; i < cache->n_slots; i++)
            free(cache->slots[i].block);
    }
    free(cache->slots);
    free(cache->buckets);
    free(cache);
}

static int cache_new(qcow2_image *img, uint64_t bytes,
                     qcow2_refcount_cache **out)
{
    qcow2_refcount_cache *cache;
    uint64_t blocks;
    uint32_t n = 8;

    *out = NULL;
    if (bytes == 0)
        bytes = qcow2_default_refcount_cache_bytes(img);
    blocks = bytes / img->cluster_size;
    blocks = min_u64(max_u64(blocks, RC_CACHE_MIN_BLOCKS), RC_CACHE_MAX_SLOTS);
    cache = calloc(1, sizeof *cache);
    if (!cache)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (refcount "
                          "cache)");
    cache->block_bytes = img->cluster_size;
    cache->cluster_bits = img->cluster_bits;
    cache->n_slots = (uint32_t)blocks;
    while (n < cache->n_slots * 2u)
        n <<= 1;
    cache->n_buckets = n;
    cache->buckets = malloc(cache->n_buckets * sizeof *cache->buckets);
    cache->slots = calloc(cache->n_slots, sizeof *cache->slots);
    if (!cache->buckets || !cache->slots) {
        qcow2_refcount_cache_free(cache);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (refcount "
                          "cache)");
    }
    for (uint32_t i = 0; i < cache->n_buckets; i++)
        cache->buckets[i] = NO_SLOT;
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

/* The handle's cache, created on first use (img->refcount_cache_bytes,
 * 0 = default); NULL without error where none is kept. */
static int cache_attach(qcow2_image *img, qcow2_refcount_cache **out)
{
    int rc = 0;

    *out = NULL;
    if (!cache_allowed(img))
        return 0;
    if (!img->refcount_cache)
        rc = cache_new(img, img->refcount_cache_bytes, &img->refcount_cache);
    *out = img->refcount_cache;
    return rc;
}

static void lru_unlink(qcow2_refcount_cache *cache, int32_t index)
{
    rc_slot *slot = &cache->slots[index];

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

static void lru_push_head(qcow2_refcount_cache *cache, int32_t index)
{
    rc_slot *slot = &cache->slots[index];

    slot->lru_prev = NO_SLOT;
    slot->lru_next = cache->lru_head;
    if (cache->lru_head != NO_SLOT)
        cache->slots[cache->lru_head].lru_prev = index;
    cache->lru_head = index;
    if (cache->lru_tail == NO_SLOT)
        cache->lru_tail = index;
}

static void lru_push_tail(qcow2_refcount_cache *cache, int32_t index)
{
    rc_slot *slot = &cache->slots[index];

    slot->lru_next = NO_SLOT;
    slot->lru_prev = cache->lru_tail;
    if (cache->lru_tail != NO_SLOT)
        cache->slots[cache->lru_tail].lru_next = index;
    cache->lru_tail = index;
    if (cache->lru_head == NO_SLOT)
        cache->lru_head = index;
}

static int32_t hash_find(const qcow2_refcount_cache *cache, uint64_t offset)
{
    int32_t index = cache->buckets[bucket_of(cache, offset)];

    while (index != NO_SLOT && cache->slots[index].offset != offset)
        index = cache->slots[index].hash_next;
    return index;
}

static void hash_insert(qcow2_refcount_cache *cache, int32_t index)
{
    uint32_t bucket = bucket_of(cache, cache->slots[index].offset);

    cache->slots[index].hash_next = cache->buckets[bucket];
    cache->buckets[bucket] = index;
}

static void hash_remove(qcow2_refcount_cache *cache, int32_t index)
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
static void slot_release(qcow2_refcount_cache *cache, int32_t index)
{
    if (cache->slots[index].used) {
        hash_remove(cache, index);
        cache->n_used--;
    }
    cache->slots[index].used = 0;
    lru_unlink(cache, index);
    lru_push_tail(cache, index);
}

/* The least recently used slot, emptied, with its buffer allocated. */
static int take_slot(qcow2_image *img, qcow2_refcount_cache *cache,
                     int32_t *out)
{
    int32_t index = cache->lru_tail;
    rc_slot *slot = &cache->slots[index];

    slot_release(cache, index);
    if (!slot->block && !(slot->block = malloc(cache->block_bytes)))
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory (refcount "
                          "block)");
    *out = index;
    return 0;
}

static void slot_publish(qcow2_refcount_cache *cache, int32_t index,
                         uint64_t offset)
{
    cache->slots[index].offset = offset;
    cache->slots[index].used = 1;
    cache->n_used++;
    hash_insert(cache, index);
    lru_unlink(cache, index);
    lru_push_head(cache, index);
}

int qcow2_refcount_block_read(qcow2_image *img, uint64_t block_offset,
                              uint64_t byte_start, void *buf, size_t len)
{
    qcow2_refcount_cache *cache;
    int32_t index;
    int64_t n;
    int rc;

    if (len == 0)
        return 0;
    rc = cache_attach(img, &cache);
    if (rc < 0)
        return rc;
    if (!cache || block_offset == 0 ||
        !is_aligned(block_offset, img->cluster_size) ||
        byte_start > cache->block_bytes ||
        len > cache->block_bytes - byte_start)
        goto direct;
    index = hash_find(cache, block_offset);
    if (index == NO_SLOT) {
        rc = take_slot(img, cache, &index);
        if (rc < 0)
            return rc;
        n = img->io->ops->pread(img->io, cache->slots[index].block,
                                (size_t)cache->block_bytes, block_offset);
        /* A block cut short by the end of the file (or an error) is not
         * kept: the direct read gives the error the caller always got. */
        if (n < 0 || (uint64_t)n < cache->block_bytes)
            goto direct;
        slot_publish(cache, index, block_offset);
    } else {
        lru_unlink(cache, index);
        lru_push_head(cache, index);
    }
    memcpy(buf, cache->slots[index].block + byte_start, len);
    return 0;
direct:
    return qcow2_read_meta(img, block_offset + byte_start, buf, len,
                           "refcount block");
}

void qcow2_refcount_cache_install(qcow2_image *img, uint64_t block_offset,
                                  const void *block)
{
    qcow2_refcount_cache *cache;
    int32_t index;

    if (cache_attach(img, &cache) < 0 || !cache) {
        img->err.code = 0;      /* no cache is not a failure */
        img->err.msg[0] = '\0';
        return;
    }
    index = hash_find(cache, block_offset);
    if (index == NO_SLOT) {
        if (take_slot(img, cache, &index) < 0) {
            img->err.code = 0;
            img->err.msg[0] = '\0';
            return;
        }
        memcpy(cache->slots[index].block, block, cache->block_bytes);
        slot_publish(cache, index, block_offset);
        return;
    }
    memcpy(cache->slots[index].block, block, cache->block_bytes);
    lru_unlink(cache, index);
    lru_push_head(cache, index);
}

/* Apply fn to every cached block overlapping [offset, offset+length):
 * by lookup of each cluster in the range, or by a scan of the slots when
 * that is shorter. */
static void for_overlapping(qcow2_refcount_cache *cache, uint64_t offset,
                            uint64_t length, const uint8_t *buf)
{
    uint64_t first = offset >> cache->cluster_bits;
    uint64_t last = (offset + length - 1) >> cache->cluster_bits;

    if (last - first + 1 <= cache->n_slots) {
        for (uint64_t c = first; c <= last; c++) {
            int32_t index = hash_find(cache, c << cache->cluster_bits);
            if (index == NO_SLOT)
                continue;
            if (buf) {
                uint64_t start = max_u64(offset, c << cache->cluster_bits);
                uint64_t end = min_u64(offset + length,
                                       (c + 1) << cache->cluster_bits);
                memcpy(cache->slots[index].block +
                       (start - (c << cache->cluster_bits)),
                       buf + (start - offset), (size_t)(end - start));
            } else {
                slot_release(cache, index);
            }
        }
        return;
    }
    for (uint32_t i = 0; i < cache->n_slots; i++) {
        rc_slot *slot = &cache->slots[i];
        uint64_t start, end;

        if (!slot->used ||
            !ranges_overlap(slot->offset, cache->block_bytes, offset, length))
            continue;
        if (!buf) {
            slot_release(cache, (int32_t)i);
            continue;
        }
        start = max_u64(offset, slot->offset);
        end = min_u64(offset + length, slot->offset + cache->block_bytes);
        memcpy(slot->block + (start - slot->offset), buf + (start - offset),
               (size_t)(end - start));
    }
}

void qcow2_refcount_cache_written(qcow2_image *img, uint64_t offset,
                                  const void *buf, size_t length, int ok)
{
    qcow2_refcount_cache *cache = img->refcount_cache;

    if (!cache || cache->n_used == 0 || length == 0 ||
        !range_inside(offset, length, UINT64_MAX))
        return;
    for_overlapping(cache, offset, length, ok ? buf : NULL);
}

void qcow2_refcount_cache_drop(qcow2_image *img, uint64_t block_offset)
{
    qcow2_refcount_cache *cache = img->refcount_cache;
    int32_t index;

    if (!cache)
        return;
    index = hash_find(cache, block_offset);
    if (index != NO_SLOT)
        slot_release(cache, index);
}

void qcow2_refcount_cache_drop_all(qcow2_image *img)
{
    qcow2_refcount_cache *cache = img ? img->refcount_cache : NULL;

    if (!cache)
        return;
    for (uint32_t i = 0; i < cache->n_slots; i++) {
        if (cache->slots[i].used)
            slot_release(cache, (int32_t)i);
    }
}
