/*
 * Refcount writes and host-cluster allocation (QEMU's qcow2-refcount.c,
 * write side): refcount updates, first-fit cluster allocation, byte
 * allocation for compressed streams, new refcount blocks and
 * refcount-table growth (QEMU's qcow2_refcount_area), in crash-safe
 * order. They recurse into each other (an update needs a block, a block
 * needs a table entry, a new table frees the old one), so they share
 * this one file, as in QEMU. The reads they build on (spans, lookups,
 * the free-cluster search) are refcount_scan.c, below.
 *
 * Every update reads the bytes of the refcount block it touches from the
 * refcount-block cache (refcount_cache.c, which reads each block whole
 * once). A handle that defers refcounts (write-back cache, lazy
 * refcounts) patches the cached block, left dirty for cache_flush.c to
 * write before the L2 tables that need it; otherwise, and always while
 * refcount structures are built (new blocks, table growth: they are
 * hooked in with synced writes, so what they count must be on disk too),
 * exactly the changed bytes are written at once, and one barrier orders
 * an increase before the L2 entry that depends on it. A decrease waits
 * until the dirty L2 tables (which no longer point at the cluster) are
 * on disk, so a freed cluster is never reused under a live reference.
 */
#include <stdlib.h>
#include <string.h>

#include "alloc.h"

/* ---- Guards and the refcount table -------------------------------------- */

static int need_write_state(qcow2_image *img)
{
    if (!img->ws || img->read_only)
        return qcow2_fail(img, QCOW2_E_READONLY, "image is open read-only");
    return 0;
}

/* Write one reftable entry (8 bytes, synced) and mirror it in memory. */
static int reftable_hook(qcow2_image *img, uint64_t index, uint64_t block)
{
    uint8_t entry[8];
    int rc;

    put_be64(entry, block);
    rc = qcow2_write_checked(img, OVERLAP_REFCOUNT_TABLE, "refcount_table",
                             img->hdr.refcount_table_offset + index * 8,
                             entry, sizeof entry);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        return rc;
    img->reftable[index] = block;
    return 0;
}

/* Deferred into the cached block, or written through: only the bytes
 * that hold the span's entries (qcow2_write_checked patches the cached
 * block too). */
static int span_store(qcow2_image *img, const refblock_span *span)
{
    if (qcow2_meta_defer_refcounts(img) &&
        qcow2_refcount_cache_patch(img, span->block_offset, span->byte_start,
                                   span->bytes, span->byte_len))
        return 0;
    return qcow2_write_checked(img, OVERLAP_REFCOUNT_BLOCK, "refcount_block",
                               span->block_offset + span->byte_start,
                               span->bytes, span->byte_len);
}

/* ---- Refcount updates -------------------------------------------------- */

/* The new refcount of `cluster`, or a refusal that names it. */
static int apply_delta(qcow2_image *img, uint64_t cluster, uint64_t current,
                       int64_t delta, uint64_t *updated)
{
    uint64_t magnitude = delta < 0 ? (uint64_t)(-(delta + 1)) + 1
                                   : (uint64_t)delta;
    uint64_t max = img->refcount_codec->max;

    if (delta < 0) {
        if (current < magnitude)
            return qcow2_fail(img, QCOW2_E_CORRUPT, "refcount of cluster "
                              "%llu would drop below zero (refcount=%llu)",
                              (unsigned long long)cluster,
                              (unsigned long long)current);
        *updated = current - magnitude;
        return 0;
    }
    if (current > max || magnitude > max - current)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "refcount of cluster "
                          "%llu would exceed the %u-bit maximum %llu",
                          (unsigned long long)cluster, img->refcount_bits,
                          (unsigned long long)max);
    *updated = current + magnitude;
    return 0;
}

/* A cluster dropped to 0: the first-fit search may find it again, and
 * compressed packing must not continue inside it. */
static void cluster_freed(qcow2_image *img, uint64_t cluster)
{
    qcow2_write_state *ws = img->ws;
    if (cluster < ws->free_cluster_hint)
        ws->free_cluster_hint = cluster;
    if (ws->free_byte_offset &&
        ws->free_byte_offset >> img->cluster_bits == cluster)
        ws->free_byte_offset = 0;
}

/*
 * One pass over clusters [first, last]: check every new value (apply 0)
 * or write them (apply 1), one refcount block span at a time.
 */
static int update_pass(qcow2_image *img, uint64_t first, uint64_t last,
                       int64_t delta, int apply, uint8_t *bytes)
{
    uint64_t entries = img->refblock_entries;

    for (uint64_t cluster = first; cluster <= last;) {
        uint64_t in_block = cluster % entries, block, updated;
        uint64_t n = min_u64(entries - in_block, last - cluster + 1);
        refblock_span span;
        int rc = alloc_refblock_at(img, cluster / entries, &block);

        if (rc < 0)
            return rc;
        if (block == 0) {
            if (apply)      /* ensured before applying an increase */
                return qcow2_fail(img, QCOW2_E_CORRUPT, "no refcount block "
                                  "for cluster %llu",
                                  (unsigned long long)cluster);
            rc = apply_delta(img, cluster, 0, delta, &updated);
            if (rc < 0)
                return rc;
            cluster += n;
            continue;
        }
        alloc_span_init(img, block, in_block, n, bytes, &span);
        rc = alloc_span_load(img, &span);
        if (rc < 0)
            return rc;
        for (uint64_t k = 0; k < n; k++) {
            rc = apply_delta(img, cluster + k,
                             alloc_span_get(&span, in_block + k), delta, &updated);
            if (rc < 0)
                return rc;
            if (apply) {
                alloc_span_set(&span, in_block + k, updated);
                if (updated == 0)
                    cluster_freed(img, cluster + k);
            }
        }
        if (apply) {
            rc = span_store(img, &span);
            if (rc < 0)
                return rc;
        }
        cluster += n;
    }
    return 0;
}

static int create_refblock(qcow2_image *img, uint64_t index,
                           uint64_t needed_cluster, uint64_t avoid_first,
                           uint64_t avoid_last);

/*
 * Make sure every cluster of [first, last] has a refcount block. Returns
 * 1 when one had to be made (the caller's free clusters may be gone:
 * search again) with *needed the first cluster that lacked it, 0 when all
 * were there.
 */
static int ensure_refblocks(qcow2_image *img, uint64_t first, uint64_t last,
                            uint64_t *needed)
{
    uint64_t entries = img->refblock_entries;

    for (uint64_t index = first / entries; index <= last / entries;
         index++) {
        uint64_t block;
        int rc = alloc_refblock_at(img, index, &block);
        if (rc < 0)
            return rc;
        if (block == 0) {
            *needed = max_u64(first, index * entries);
            img->ws->hold++;    /* refcount structures: written through */
            rc = create_refblock(img, index, *needed, first, last);
            img->ws->hold--;
            return rc < 0 ? rc : 1;
        }
    }
    return 0;
}

int qcow2_refcount_update(qcow2_image *img, uint64_t offset, uint64_t length,
                          int64_t delta)
{
    uint64_t end, first, last;
    uint8_t *bytes;
    int rc;

    rc = need_write_state(img);
    if (rc < 0 || length == 0 || delta == 0)
        return rc;
    if (add_overflows(offset, length, &end) ||
        end - 1 > QCOW2_MAX_HOST_OFFSET)
        return qcow2_fail(img, QCOW2_E_INVALID, "refcount update of "
                          "0x%llx+0x%llx is past the largest host offset",
                          (unsigned long long)offset,
                          (unsigned long long)length);
    first = offset >> img->cluster_bits;
    last = (end - 1) >> img->cluster_bits;
    bytes = qcow2_spare_take(&img->ws->spare_block, img->cluster_size);
    if (!bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");

    /* Check every cluster first: a refused update changes nothing. */
    rc = update_pass(img, first, last, delta, 0, bytes);
    /* The tables that dropped the reference reach the disk first. */
    if (rc == 0 && delta < 0)
        rc = qcow2_meta_flush_l2(img);
    while (rc == 0 && delta > 0) {
        uint64_t needed;
        rc = ensure_refblocks(img, first, last, &needed);
        if (rc != 1)
            break;
        rc = 0;
        img->ws->free_cluster_hint = min_u64(img->ws->free_cluster_hint,
                                             first);
    }
    if (rc == 0)
        rc = update_pass(img, first, last, delta, 1, bytes);
    qcow2_spare_give(&img->ws->spare_block, bytes);
    return rc;
}

int qcow2_free_clusters(qcow2_image *img, uint64_t offset, uint64_t length)
{
    return qcow2_refcount_update(img, offset, length, -1);
}

/* ---- New refcount blocks ------------------------------------------------ */

/* Write a zeroed refcount block at `cluster`; with `self` its own entry
 * says 1 (it lies inside the range it covers). Synced. */
static int write_new_refblock(qcow2_image *img, uint64_t cluster, int self)
{
    uint8_t *bytes = calloc(1, img->cluster_size);
    int rc;

    if (!bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    if (self) {
        refblock_span span;
        uint64_t entry = cluster % img->refblock_entries;
        alloc_span_init(img, 0, 0, img->refblock_entries, bytes, &span);
        alloc_span_set(&span, entry, 1);
    }
    rc = qcow2_write_checked(img, OVERLAP_REFCOUNT_BLOCK, "refcount_block",
                             cluster << img->cluster_bits, bytes,
                             img->cluster_size);
    if (rc == 0)    /* its entries are updated next: keep it */
        qcow2_refcount_cache_install(img, cluster << img->cluster_bits,
                                     bytes);
    free(bytes);
    if (rc == 0)
        rc = qcow2_barrier(img);
    return rc;
}

/* Hook a written block into the table, growing the table (QEMU's way)
 * when the index lies past it. */
static int hook_refblock(qcow2_image *img, uint64_t index, uint64_t cluster,
                         uint64_t needed_cluster)
{
    uint64_t entries = img->refblock_entries, blocks_used, meta_offset, end;

    if (index < img->reftable_entries)
        return reftable_hook(img, index, cluster << img->cluster_bits);
    /* Nothing past the old table's coverage is in use but this block:
     * the new table and its blocks go right after the coverage of the
     * clusters we need, where they describe themselves. */
    blocks_used = div_round_up(max_u64(needed_cluster, cluster) + 1, entries);
    if (mul_overflows(blocks_used, entries, &meta_offset) ||
        meta_offset > alloc_max_host_cluster(img))
        return qcow2_fail(img, QCOW2_E_NOSPC, "refcount table cannot grow "
                          "past the largest host offset");
    meta_offset <<= img->cluster_bits;
    return qcow2_refcount_area(img, meta_offset, 0, 0, index,
                               cluster << img->cluster_bits, &end);
}

/*
 * A refcount block for reftable entry `index` (empty), as QEMU places
 * one: at the first free cluster (never inside the caller's range
 * [avoid_first, avoid_last]). A block inside the range it covers counts
 * itself; one outside is counted by its own block first. When that one is
 * missing too, the cluster becomes that block instead, self-describing,
 * and the caller asks again.
 */
static int create_refblock(qcow2_image *img, uint64_t index,
                           uint64_t needed_cluster, uint64_t avoid_first,
                           uint64_t avoid_last)
{
    qcow2_write_state *ws = img->ws;
    uint64_t entries = img->refblock_entries, cluster, own_index, own_block;
    int rc;

    rc = alloc_find_free_run(img, &ws->free_cluster_hint, 1, &cluster);
    if (rc == 0 && cluster >= avoid_first && cluster <= avoid_last) {
        uint64_t from = avoid_last + 1;
        rc = alloc_find_free_run(img, &from, 1, &cluster);
    }
    if (rc < 0)
        return rc;
    own_index = cluster / entries;
    rc = alloc_refblock_at(img, own_index, &own_block);
    if (rc < 0)
        return rc;

    if (own_index == index) {
        rc = write_new_refblock(img, cluster, 1);
        if (rc < 0)
            return rc;
        return hook_refblock(img, index, cluster, needed_cluster);
    }
    if (own_block == 0) {
        /* QEMU recurses here: the block's own block comes first (at the
         * next free cluster); this cluster stays free and the search
         * restarts from it. */
        rc = create_refblock(img, own_index, cluster, cluster, cluster);
        ws->free_cluster_hint = min_u64(ws->free_cluster_hint, cluster);
        return rc;
    }
    /* Counted elsewhere: refcount first, then the block, then the hook,
     * so a crash leaves at worst a leaked cluster. */
    rc = qcow2_refcount_update(img, cluster << img->cluster_bits,
                               img->cluster_size, 1);
    if (rc == 0)
        rc = write_new_refblock(img, cluster, 0);
    if (rc == 0)
        rc = hook_refblock(img, index, cluster, needed_cluster);
    return rc;
}

/* ---- Refcount table growth ------------------------------------------------ */

/* QEMU's fixed point: refcount blocks needed so that `clusters` plus the
 * blocks and table themselves are covered; `generous` adds half the
 * table again, as QEMU does for a table that will keep growing. */
static uint64_t refcount_blocks_needed(const qcow2_image *img,
                                       uint64_t clusters, int generous)
{
    uint64_t per_table_cluster = img->cluster_size / 8;
    uint64_t entries = img->refblock_entries;
    uint64_t table = 0, blocks = 0, total = 0, previous;

    do {
        previous = total;
        blocks = div_round_up(clusters + table + blocks, entries);
        table = div_round_up(blocks, per_table_cluster);
        total = clusters + blocks + table;
        if (total == previous && generous) {
            clusters += div_round_up(table, 2);
            total = 0;
            generous = 0;
        }
    } while (total != previous);
    return blocks;
}

/* Set refcount 1 on the clusters of [area_first, area_end) that refcount
 * block `index` covers; they must be free. A new block is written whole. */
static int count_area_in_block(qcow2_image *img, uint64_t index,
                               uint64_t block, int is_new,
                               uint64_t area_first, uint64_t area_end,
                               uint8_t *bytes)
{
    uint64_t entries = img->refblock_entries;
    uint64_t covered = index * entries;
    uint64_t first = max_u64(area_first, covered);
    uint64_t end = min_u64(area_end, covered + entries);
    refblock_span span;
    int rc;

    if (is_new) {
        memset(bytes, 0, img->cluster_size);
        alloc_span_init(img, block, 0, entries, bytes, &span);
    } else if (first < end) {
        alloc_span_init(img, block, first - covered, end - first, bytes, &span);
        rc = alloc_span_load(img, &span);
        if (rc < 0)
            return rc;
    } else {
        return 0;
    }
    for (uint64_t c = first; c < end; c++) {
        if (alloc_span_get(&span, c - covered) != 0)
            return qcow2_fail(img, QCOW2_E_CORRUPT, "cluster %llu meant for "
                              "the new refcount structures is in use",
                              (unsigned long long)c);
        alloc_span_set(&span, c - covered, 1);
    }
    rc = span_store(img, &span);
    if (rc == 0 && is_new)
        qcow2_refcount_cache_install(img, block, bytes);
    return rc;
}

static int write_reftable(qcow2_image *img, const uint64_t *table,
                          uint64_t entries, uint64_t offset)
{
    uint8_t *bytes = malloc(entries * 8);
    int rc;

    if (!bytes)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint64_t i = 0; i < entries; i++)
        put_be64(bytes + i * 8, table[i]);
    rc = qcow2_write_checked(img, OVERLAP_REFCOUNT_TABLE, "refcount_table",
                             offset, bytes, entries * 8);
    free(bytes);
    return rc;
}

static int refcount_area(qcow2_image *img, uint64_t start_offset,
                         uint64_t additional_clusters, int exact,
                         uint64_t new_block_index, uint64_t new_block_offset,
                         uint64_t *end_offset)
{
    uint64_t cs = img->cluster_size, per_table_cluster = cs / 8;
    uint64_t start = start_offset >> img->cluster_bits;
    uint64_t clusters, total_blocks, table_entries, table_clusters;
    uint64_t area_index, missing = 0, block_cluster, table_cluster, end;
    uint64_t old_offset = img->hdr.refcount_table_offset;
    uint64_t old_clusters = img->hdr.refcount_table_clusters;
    uint64_t *table;
    uint8_t *bytes;
    int rc;

    rc = need_write_state(img);
    if (rc < 0)
        return rc;
    if (!is_aligned(start_offset, cs) ||
        add_overflows(start, additional_clusters, &clusters) ||
        clusters > alloc_max_host_cluster(img))
        return qcow2_fail(img, QCOW2_E_NOSPC, "refcount structures for "
                          "0x%llx clusters do not fit",
                          (unsigned long long)additional_clusters);
    total_blocks = refcount_blocks_needed(img, clusters, !exact);
    table_entries = exact ? total_blocks
                          : total_blocks + div_round_up(total_blocks, 2);
    table_entries = align_up(table_entries, per_table_cluster);
    if (total_blocks > REFTABLE_MAX_ENTRIES ||
        table_entries > REFTABLE_MAX_ENTRIES)
        return qcow2_fail(img, QCOW2_E_NOSPC, "refcount table would exceed "
                          "%u bytes", QCOW2_MAX_REFTABLE_BYTES);
    table_clusters = table_entries / per_table_cluster;
    area_index = start / img->refblock_entries;

    table = calloc(table_entries, sizeof *table);
    bytes = malloc(cs);
    if (!table || !bytes) {
        rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        goto out;
    }
    for (uint64_t i = 0; i < img->reftable_entries; i++) {
        if (i < table_entries) {
            table[i] = img->reftable[i];
        } else if (img->reftable[i]) {
            rc = qcow2_fail(img, QCOW2_E_INVALID, "refcount block %llu in "
                            "use past the new refcount table",
                            (unsigned long long)i);
            goto out;
        }
    }
    if (new_block_offset) {
        if (new_block_index >= total_blocks) {
            rc = qcow2_fail(img, QCOW2_E_INVALID, "new refcount block %llu "
                            "outside the new refcount table",
                            (unsigned long long)new_block_index);
            goto out;
        }
        table[new_block_index] = new_block_offset;
    }
    for (uint64_t i = area_index; i < total_blocks; i++)
        missing += table[i] == 0;
    table_cluster = start + missing;
    end = table_cluster + table_clusters;

    /* The blocks first (new ones whole), each counting the new
     * structures it covers; then the table; then the header switch. */
    block_cluster = start;
    for (uint64_t i = area_index; i < total_blocks; i++) {
        int is_new = table[i] == 0;
        if (is_new)
            table[i] = (block_cluster++) << img->cluster_bits;
        rc = count_area_in_block(img, i, table[i] & REFT_OFFSET_MASK, is_new,
                                 start, end, bytes);
        if (rc < 0)
            goto out;
    }
    rc = qcow2_barrier(img);
    if (rc == 0)
        rc = write_reftable(img, table, table_entries,
                            table_cluster << img->cluster_bits);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_reftable(img, table_cluster << img->cluster_bits,
                                       (uint32_t)table_clusters);
    if (rc < 0)
        goto out;

    free(img->reftable);
    img->reftable = table;
    img->reftable_entries = table_entries;
    table = NULL;
    *end_offset = end << img->cluster_bits;
    /* A failure to free the old table only leaks it. */
    if (old_clusters)
        (void)qcow2_free_clusters(img, old_offset, old_clusters * cs);
    rc = 0;
out:
    free(table);
    free(bytes);
    return rc;
}

/* Refcount structures are written through (see the top of the file). */
int qcow2_refcount_area(qcow2_image *img, uint64_t start_offset,
                        uint64_t additional_clusters, int exact,
                        uint64_t new_block_index, uint64_t new_block_offset,
                        uint64_t *end_offset)
{
    int rc;

    if (img->ws)
        img->ws->hold++;
    rc = refcount_area(img, start_offset, additional_clusters, exact,
                       new_block_index, new_block_offset, end_offset);
    if (img->ws)
        img->ws->hold--;
    return rc;
}

/* ---- Allocation ------------------------------------------------------------ */

/* A free run of count clusters, each with its refcount block. */
static int find_run(qcow2_image *img, uint64_t count, uint64_t *start)
{
    qcow2_write_state *ws = img->ws;
    int rc;

    for (;;) {
        uint64_t needed;

        rc = alloc_find_free_run(img, &ws->free_cluster_hint, count, start);
        if (rc < 0)
            return rc;
        rc = ensure_refblocks(img, *start, *start + count - 1, &needed);
        if (rc < 0)
            return rc;
        if (rc == 0)
            break;
        /* A new block may sit where the run was: search again, trying
         * the same clusters first (QEMU's -EAGAIN restart). */
        (void)needed;
        ws->free_cluster_hint = min_u64(ws->free_cluster_hint, *start);
    }
    return 0;
}

/*
 * Writethrough: every allocating write would pay a sync for its
 * refcount and its data before its L2 entry. Clusters are counted in
 * batches instead (refcount 1, referenced by nothing yet; deferred under
 * lazy refcounts) and handed out from the batch. A batch at the end of
 * the file is also made part of the file (a hole: it reads zeroes, and
 * qemu-img check accepts references into it). Once a sync has followed
 * the batch, an entry for one of its clusters needs no barrier: its
 * refcount is on disk, and landing before its data it reads zeroes, as
 * the guest read before the write (write.c decides that). A crash leaks
 * what is left of the batch (a leak is not a corruption); a flush, close
 * or operation behind the caches gives it back first (ws->give_back,
 * called from cache_flush.c).
 */
#define RESERVE_BATCH 64u

static int reserve_wanted(const qcow2_image *img, uint64_t count)
{
    const qcow2_write_state *ws = img->ws;

    return ws->reserve_batches && ws->hold == 0 &&
           !(img->hdr.incompatible_features & INCOMPAT_DATA_FILE) &&
           count <= RESERVE_BATCH;
}

int qcow2_alloc_give_back(qcow2_image *img)
{
    qcow2_write_state *ws = img->ws;
    uint64_t first, count;

    if (!ws || ws->reserved_count == 0)
        return 0;
    first = ws->reserved_first;
    count = ws->reserved_count;
    ws->reserved_count = 0;
    return qcow2_refcount_update(img, first << img->cluster_bits,
                                 count << img->cluster_bits, -1);
}

/* A batch at or past the end of the file: the file grows over it, so
 * its clusters are holes (*holes 1). Elsewhere they may hold old bytes. */
static int reserve_extend(qcow2_image *img, uint64_t start, int *holes)
{
    uint64_t eof, end = (start + RESERVE_BATCH) << img->cluster_bits;
    int rc;

    *holes = 0;
    if (img->io->ops->size(img->io, &eof) < 0 ||
        eof > start << img->cluster_bits)
        return 0;
    rc = img->io->ops->truncate(img->io, end);
    if (rc < 0)
        return qcow2_fail(img, rc, "growing the file to 0x%llx failed",
                          (unsigned long long)end);
    *holes = 1;
    return 0;
}

static int reserve_take(qcow2_image *img, uint64_t count, uint64_t *start)
{
    qcow2_write_state *ws = img->ws;
    int rc;

    if (ws->reserved_count < count) {
        rc = qcow2_alloc_give_back(img);
        if (rc == 0)
            rc = find_run(img, RESERVE_BATCH, start);
        if (rc == 0)
            rc = qcow2_refcount_update(img, *start << img->cluster_bits,
                                       (uint64_t)RESERVE_BATCH
                                       << img->cluster_bits, 1);
        if (rc == 0)
            rc = reserve_extend(img, *start, &ws->reserved_holes);
        if (rc < 0)
            return rc;
        ws->reserved_first = *start;
        ws->reserved_count = RESERVE_BATCH;
        ws->reserved_sync_mark = ws->syncs;
        ws->give_back = qcow2_alloc_give_back;
    }
    *start = ws->reserved_first;
    ws->reserved_first += count;
    ws->reserved_count -= count;
    ws->last_alloc_durable = ws->syncs > ws->reserved_sync_mark;
    ws->last_alloc_hole = ws->reserved_holes;
    return 0;
}

int qcow2_alloc_clusters(qcow2_image *img, uint64_t count,
                         uint64_t *host_offset)
{
    uint64_t start;
    int rc = need_write_state(img);

    if (rc < 0)
        return rc;
    if (count == 0 || count > alloc_max_host_cluster(img))
        return qcow2_fail(img, QCOW2_E_INVALID, "cannot allocate %llu "
                          "clusters", (unsigned long long)count);
    img->ws->last_alloc_durable = img->ws->last_alloc_hole = 0;
    if (reserve_wanted(img, count)) {
        rc = reserve_take(img, count, &start);
    } else {
        rc = find_run(img, count, &start);
        if (rc == 0)
            rc = qcow2_refcount_update(img, start << img->cluster_bits,
                                       count << img->cluster_bits, 1);
    }
    if (rc < 0)
        return rc;
    *host_offset = start << img->cluster_bits;
    return 0;
}

int qcow2_alloc_clusters_at(qcow2_image *img, uint64_t offset,
                            uint64_t count)
{
    uint64_t first = offset >> img->cluster_bits, last, bytes;
    int rc = need_write_state(img);

    if (rc < 0)
        return rc;
    if (count == 0)
        return 0;
    if (!is_aligned(offset, img->cluster_size) ||
        add_overflows(first, count - 1, &last) ||
        last > alloc_max_host_cluster(img))
        return qcow2_fail(img, QCOW2_E_INVALID, "cannot allocate %llu "
                          "clusters at 0x%llx", (unsigned long long)count,
                          (unsigned long long)offset);
    do {
        uint64_t needed;
        rc = ensure_refblocks(img, first, last, &needed);
    } while (rc == 1);
    if (rc < 0)
        return rc;
    for (uint64_t c = first; c <= last; c++) {
        uint64_t refcount;
        rc = qcow2_refcount_get(img, c, &refcount);
        if (rc < 0)
            return rc;
        if (refcount != 0)
            return qcow2_fail(img, QCOW2_E_CORRUPT, "cluster %llu to "
                              "allocate is in use (refcount=%llu)",
                              (unsigned long long)c,
                              (unsigned long long)refcount);
    }
    bytes = count << img->cluster_bits;
    return qcow2_refcount_update(img, offset, bytes, 1);
}

int qcow2_alloc_bytes(qcow2_image *img, uint64_t length,
                      uint64_t *host_offset)
{
    qcow2_write_state *ws;
    uint64_t cs = img->cluster_size, offset, free_in_cluster = 0;
    int rc = need_write_state(img);

    if (rc < 0)
        return rc;
    if (length == 0 || length > cs)
        return qcow2_fail(img, QCOW2_E_INVALID, "compressed allocation of "
                          "%llu bytes", (unsigned long long)length);
    ws = img->ws;
    offset = ws->free_byte_offset;
    if (offset) {
        /* Keep packing only into a live, not yet saturated cluster. */
        uint64_t refcount;
        rc = qcow2_refcount_get(img, offset >> img->cluster_bits, &refcount);
        if (rc < 0)
            return rc;
        if (refcount == 0 || refcount >= img->refcount_codec->max)
            offset = 0;
        else
            free_in_cluster = cs - (offset & (cs - 1));
    }
    while (!offset || free_in_cluster < length) {
        uint64_t cluster, needed;

        rc = alloc_find_free_run(img, &ws->free_cluster_hint, 1, &cluster);
        if (rc < 0)
            return rc;
        if (cluster == 0)
            return qcow2_fail(img, QCOW2_E_CORRUPT, "Preventing invalid "
                              "allocation of compressed cluster at offset 0");
        /* A stream may spill into the next cluster only when that one is
         * the fresh, contiguous one. */
        if (!offset || align_up(offset, cs) != cluster * cs) {
            offset = cluster * cs;
            free_in_cluster = cs;
        } else {
            free_in_cluster += cs;
        }
        rc = ensure_refblocks(img, cluster, cluster, &needed);
        if (rc < 0)
            return rc;
        if (rc == 1) {
            /* The block may have taken it: start over from the range. */
            ws->free_cluster_hint = min_u64(ws->free_cluster_hint,
                                            offset >> img->cluster_bits);
            offset = 0;
        }
    }
    rc = qcow2_refcount_update(img, offset, length, 1);
    if (rc < 0)
        return rc;
    *host_offset = offset;
    ws->free_byte_offset = offset + length;
    if (is_aligned(ws->free_byte_offset, cs))
        ws->free_byte_offset = 0;
    return 0;
}

void qcow2_write_state_defaults(qcow2_write_state *ws)
{
    memset(ws, 0, sizeof *ws);
    ws->overlap_checks = OVERLAP_CACHED;
}
