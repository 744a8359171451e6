/*
 * Both metadata caches together (issue 14's write-back cache): what a
 * handle defers, the order dirty tables reach the disk, holds for
 * operations that work behind the caches, and the counters img:stats()
 * shows.
 *
 * The order is QEMU's (qcow2-cache.c): refcount blocks before the L2
 * tables whose new entries need them (a dependency, dropped under lazy
 * refcounts, where the dirty bit covers refcounts instead), guest data
 * before any L2 table that points at it (l2_cache.c's write-back puts a
 * barrier first), and a barrier after each group. L1 entries, new tables
 * and refcount structures are written through by their callers, after
 * flushing what they depend on. Refcount decreases are applied only once
 * the L2 tables that dropped the reference are on disk (alloc.c flushes
 * them first), so no freed cluster is reused while a table on disk still
 * points at it.
 */
#include <string.h>

#include "cache.h"
#include "table_cache.h"

static int have_write_state(const qcow2_image *img)
{
    return img && img->ws && !img->read_only && !img->is_raw;
}

int qcow2_meta_defer_l2(const qcow2_image *img)
{
    return have_write_state(img) && img->ws->meta_write_back &&
           img->ws->hold == 0;
}

int qcow2_meta_defer_refcounts(const qcow2_image *img)
{
    return have_write_state(img) && img->ws->hold == 0 &&
           (img->ws->meta_write_back || img->ws->lazy_refcounts);
}

static uint32_t dirty_of(const qcow2_table_cache *cache)
{
    qcow2_table_cache_stats st;

    if (!cache)
        return 0;
    qcow2_table_cache_get_stats(cache, &st);
    return st.n_dirty;
}

int qcow2_meta_dirty(const qcow2_image *img)
{
    if (!have_write_state(img))
        return 0;
    return dirty_of(qcow2_l2_cache_tables(img)) != 0 ||
           dirty_of(qcow2_refcount_cache_blocks(img)) != 0;
}

int qcow2_meta_l2_after_refcounts(qcow2_image *img)
{
    qcow2_table_cache *l2 = qcow2_l2_cache_tables(img);
    qcow2_table_cache *rc = qcow2_refcount_cache_blocks(img);

    if (!l2 || !rc || img->ws->lazy_refcounts || dirty_of(rc) == 0)
        return 0;
    return qcow2_table_cache_set_dependency(l2, rc);
}

int qcow2_meta_flush_refcounts(qcow2_image *img)
{
    qcow2_table_cache *rc = qcow2_refcount_cache_blocks(img);

    return rc && dirty_of(rc) ? qcow2_table_cache_flush(rc) : 0;
}

int qcow2_meta_flush_l2(qcow2_image *img)
{
    qcow2_table_cache *l2 = qcow2_l2_cache_tables(img);

    return l2 && dirty_of(l2) ? qcow2_table_cache_flush(l2) : 0;
}

int qcow2_meta_flush(qcow2_image *img)
{
    int rc;

    if (!have_write_state(img) || img->ws->poisoned)
        return 0;           /* a poisoned handle writes nothing more */
    /* Reserved clusters (writethrough's batch, alloc.c) are no one's:
     * nothing behind the caches should see them counted. */
    if (img->ws->give_back && img->ws->hold == 0 &&
        (rc = img->ws->give_back(img)) < 0)
        return rc;
    if (!qcow2_meta_dirty(img))
        return 0;
    img->ws->cache_flushes++;
    rc = qcow2_meta_flush_refcounts(img);
    if (rc == 0)
        rc = qcow2_meta_flush_l2(img);
    return rc;
}

int qcow2_meta_hold(qcow2_image *img)
{
    int rc;

    if (!have_write_state(img))
        return 0;
    rc = qcow2_meta_flush(img);
    if (rc == 0)
        img->ws->hold++;
    return rc;
}

void qcow2_meta_release(qcow2_image *img)
{
    if (have_write_state(img) && img->ws->hold > 0)
        img->ws->hold--;
}

static void cache_stats(const qcow2_table_cache *cache,
                        qcow2_cache_stats *out)
{
    qcow2_table_cache_stats st;

    memset(out, 0, sizeof *out);
    if (!cache)
        return;
    qcow2_table_cache_get_stats(cache, &st);
    out->hits = st.hits;
    out->misses = st.misses;
    out->evictions = st.evictions;
    out->writebacks = st.writebacks;
    out->dirty = st.n_dirty;
    out->cached = st.n_used;
    out->slots = st.n_slots;
}

int qcow2_stats_get(qcow2_image *img, qcow2_stats *out)
{
    memset(out, 0, sizeof *out);
    if (!img)
        return QCOW2_E_INVALID;
    cache_stats(qcow2_l2_cache_tables(img), &out->l2);
    cache_stats(qcow2_refcount_cache_blocks(img), &out->refcount);
    if (img->ws) {
        out->flushes = img->ws->cache_flushes;
        out->syncs = img->ws->syncs;
    }
    if (img->io) {
        out->reads = img->io->reads;
        out->bytes_read = img->io->bytes_read;
        out->writes = img->io->writes;
        out->bytes_written = img->io->bytes_written;
    }
    return 0;
}
