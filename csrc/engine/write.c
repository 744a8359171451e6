/*
 * Guest writes (QEMU's qcow2_co_pwritev_part with qcow2-cluster.c's
 * allocation side): data clusters allocated as contiguous runs, copy on
 * write of the bytes a partial write leaves, COPIED kept exact, extended
 * L2 subcluster bitmaps, external data files; and the L2 "work" every
 * table change goes through, which puts the crash-safe order in one place:
 *
 *   data + refcount increases -> barrier -> L2 entries
 *        (-> barrier -> L1 entry, for a new table) -> barrier
 *        -> refcount decreases of what the old entries referenced
 *
 * With the write-back cache (cache_flush.c) a changed table stays dirty
 * in the L2 cache instead and the same order is kept at write-back: the
 * refcount blocks it depends on, a barrier for the data, the tables, a
 * barrier; decreases wait for the tables (alloc.c). A new table is still
 * written through, after the refcounts it needs.
 *
 * The write state itself (open, close, lazy refcounts, repair of a dirty
 * image) lives in write_state.c.
 */
#include <stdlib.h>
#include <string.h>

#include "crypto.h"
#include "write_path.h"

/* Larger runs are written in up to three pieces rather than copied whole
 * into one bounce buffer. */
#define BOUNCE_MAX  (4u << 20)
/* Encrypted data is encrypted in a copy of at most this many bytes. */
#define CRYPT_CHUNK (1u << 20)

/* ---- Small geometry helpers --------------------------------------------- */

uint64_t qcow2_l2_coverage(const qcow2_image *img)
{
    return img->l2_entries << img->cluster_bits;
}

uint32_t qcow2_l1_index(const qcow2_image *img, uint64_t guest_offset)
{
    return (uint32_t)(guest_offset >> (img->cluster_bits + img->l2_bits));
}

uint64_t qcow2_l2_index(const qcow2_image *img, uint64_t guest_offset)
{
    return (guest_offset >> img->cluster_bits) & (img->l2_entries - 1);
}

int qcow2_has_data_file(const qcow2_image *img)
{
    return (img->hdr.incompatible_features & INCOMPAT_DATA_FILE) != 0;
}

static uint32_t sc_range_mask(uint32_t first, uint32_t last)
{
    uint64_t bits = (2ull << last) - (1ull << first);
    return (uint32_t)bits;
}

int qcow2_read_current(qcow2_image *img, uint64_t guest_offset, void *buf,
                       uint64_t length)
{
    uint64_t inside = 0;

    if (guest_offset < img->size)
        inside = min_u64(length, img->size - guest_offset);
    memset((uint8_t *)buf + inside, 0, (size_t)(length - inside));
    return inside ? qcow2_read(img, guest_offset, buf, (size_t)inside) : 0;
}

/* ---- L2 entries ------------------------------------------------------------- */

static int bad_entry(qcow2_image *img, const qcow2_l2_work *work,
                     uint64_t l2_index, const qcow2_l2_desc *d,
                     const char *why)
{
    return qcow2_fail(img, QCOW2_E_CORRUPT, "L2 entry %llu of the table "
                      "for L1 entry %u is 0x%016llx (bitmap 0x%016llx): %s",
                      (unsigned long long)l2_index, work->l1_index,
                      (unsigned long long)d->entry,
                      (unsigned long long)d->bitmap, why);
}

int qcow2_l2_work_get(qcow2_image *img, const qcow2_l2_work *work,
                      uint64_t l2_index, qcow2_l2_desc *d)
{
    const uint8_t *p = work->table + l2_index * img->l2_entry_bytes;
    uint64_t entry = be64(p);
    int data_file = qcow2_has_data_file(img);

    memset(d, 0, sizeof *d);
    d->entry = entry;
    d->bitmap = img->extended_l2 ? be64(p + 8) : 0;
    if (entry & QCOW_OFLAG_COMPRESSED) {
        if (data_file || d->bitmap)
            return bad_entry(img, work, l2_index, d, "invalid compressed "
                             "cluster");
        d->compressed = 1;
        return 0;
    }
    if (entry & L2E_RESERVED_MASK)
        return bad_entry(img, work, l2_index, d, "reserved bits set");
    d->host = entry & L2E_OFFSET_MASK;
    if (!is_aligned(d->host, img->cluster_size))
        return bad_entry(img, work, l2_index, d, "host offset is not "
                         "cluster aligned");
    /* With a data file, offset 0 is a real cluster when COPIED says so. */
    d->has_host = d->host != 0 || (data_file && (entry & QCOW_OFLAG_COPIED));
    if (!img->extended_l2) {
        if (entry & QCOW_OFLAG_ZERO) {
            if (img->hdr.version < 3)
                return bad_entry(img, work, l2_index, d, "zero flag in a "
                                 "version 2 image");
            d->zero_mask = 1;
            d->has_host = d->host != 0;
        } else if (d->has_host) {
            d->normal_mask = 1;
        }
        return 0;
    }
    d->normal_mask = (uint32_t)d->bitmap;
    d->zero_mask = (uint32_t)(d->bitmap >> 32);
    if (d->normal_mask & d->zero_mask)
        return bad_entry(img, work, l2_index, d, "subclusters both "
                         "allocated and zero");
    if (!d->has_host && d->normal_mask)
        return bad_entry(img, work, l2_index, d, "allocated subclusters "
                         "without a host cluster");
    return 0;
}

void qcow2_l2_work_set(qcow2_image *img, qcow2_l2_work *work,
                       uint64_t l2_index, uint64_t entry, uint64_t bitmap)
{
    uint8_t *p = work->table + l2_index * img->l2_entry_bytes;

    put_be64(p, entry);
    if (img->extended_l2)
        put_be64(p + 8, bitmap);
    work->n_set++;
    if (work->dirty_first == work->dirty_end) {
        work->dirty_first = l2_index;
        work->dirty_end = l2_index + 1;
    } else {
        work->dirty_first = min_u64(work->dirty_first, l2_index);
        work->dirty_end = max_u64(work->dirty_end, l2_index + 1);
    }
}

void qcow2_l2_work_release(qcow2_l2_work *work, uint64_t old_entry)
{
    work->released[work->n_released++] = old_entry;
}

/* ---- The L2 work: load, commit ------------------------------------------ */

int qcow2_l2_work_begin(qcow2_image *img, uint32_t l1_index,
                        qcow2_l2_work *work)
{
    return qcow2_l2_work_begin_range(img, l1_index, 0, img->l2_entries,
                                     work);
}

int qcow2_l2_work_begin_range(qcow2_image *img, uint32_t l1_index,
                              uint64_t first, uint64_t count,
                              qcow2_l2_work *work)
{
    uint64_t l1_entry = l1_index < img->l1_size ? img->l1[l1_index] : 0;
    uint8_t *cached;
    int rc;

    memset(work, 0, sizeof *work);
    work->l1_index = l1_index;
    if (l1_index >= img->l1_size)
        return qcow2_fail(img, QCOW2_E_INVALID, "L1 index %u past the L1 "
                          "table", l1_index);
    if (l1_entry & L1E_RESERVED_MASK)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "L1 entry %u has reserved "
                          "bits set: 0x%016llx", l1_index,
                          (unsigned long long)l1_entry);
    work->table = qcow2_spare_take(img->ws ? &img->ws->spare_table : NULL,
                                   img->cluster_size);
    work->released = qcow2_spare_take(img->ws ? &img->ws->spare_released
                                              : NULL,
                                      img->l2_entries *
                                      sizeof *work->released);
    work->ws = img->ws;
    if (!work->table || !work->released)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    work->l2_offset = l1_entry & L1E_OFFSET_MASK;
    if (work->l2_offset == 0) {
        memset(work->table, 0, img->cluster_size);
        work->needs_new = 1;
        return 0;
    }
    if (!is_aligned(work->l2_offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT, "L1 entry %u: L2 table "
                          "offset 0x%llx is not cluster aligned", l1_index,
                          (unsigned long long)work->l2_offset);
    /* A table without COPIED is shared with a snapshot: never written in
     * place, copied to fresh clusters on commit. */
    work->needs_new = !(l1_entry & QCOW_OFLAG_COPIED);
    rc = qcow2_l2_cache_get(img, work->l2_offset, &cached);
    if (rc < 0)
        return rc;
    /* A table changed in place needs only the entries the caller uses;
     * one copied to new clusters is written whole. */
    if (work->needs_new || first >= img->l2_entries ||
        count > img->l2_entries - first) {
        first = 0;
        count = img->l2_entries;
    }
    memcpy(work->table + first * img->l2_entry_bytes,
           cached + first * img->l2_entry_bytes,
           (size_t)(count * img->l2_entry_bytes));
    return 0;
}

void qcow2_l2_work_end(qcow2_l2_work *work)
{
    qcow2_spare_give(work->ws ? &work->ws->spare_table : NULL, work->table);
    qcow2_spare_give(work->ws ? &work->ws->spare_released : NULL,
                     work->released);
    work->table = NULL;
    work->released = NULL;
}

/* Drop the reference one old L2 entry held. Failures only leak. */
static void release_entry(qcow2_image *img, uint64_t entry)
{
    if (entry & QCOW_OFLAG_COMPRESSED) {
        uint32_t x = 70 - img->cluster_bits;
        uint64_t coffset = entry & ((1ull << x) - 1);
        uint64_t sectors = ((entry >> x) &
                            ((1ull << (img->cluster_bits - 8)) - 1)) + 1;
        /* The stream's sectors, as QEMU frees them; its bytes may come
         * back under another stream, so the kept cluster is forgotten. */
        (void)qcow2_free_clusters(img, coffset & ~511ull, sectors * 512);
        if (img->codec)
            qcow2_codec_forget(img->codec);
        return;
    }
    /* Data-file clusters are not refcounted. */
    if (qcow2_has_data_file(img) || (entry & L2E_OFFSET_MASK) == 0)
        return;
    (void)qcow2_free_clusters(img, entry & L2E_OFFSET_MASK,
                              img->cluster_size);
}

int qcow2_l1_entries_write(qcow2_image *img, uint32_t first,
                           const uint64_t *entries, uint32_t count)
{
    uint8_t bytes[8 * 512];
    int rc;

    if (count == 0 || count > 512)
        return qcow2_fail(img, QCOW2_E_INVALID, "%u L1 entries in one write",
                          count);
    for (uint32_t k = 0; k < count; k++)
        put_be64(bytes + 8 * k, entries[k]);
    rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L1, "l1",
                             img->hdr.l1_table_offset + 8ull * first,
                             bytes, 8u * count);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        return qcow2_poison(img, rc);
    memcpy(img->l1 + first, entries, 8u * count);
    return 0;
}

int qcow2_l1_entry_write(qcow2_image *img, uint32_t l1_index,
                         uint64_t entry)
{
    return qcow2_l1_entries_write(img, l1_index, &entry, 1);
}

/* A table at fresh clusters: written whole, synced, then hooked into the
 * L1 table; a shared table it replaces loses the active reference last. */
static int commit_new_table(qcow2_image *img, qcow2_l2_work *work)
{
    uint64_t old = work->l2_offset, fresh, syncs;
    int rc;

    rc = qcow2_alloc_clusters(img, 1, &fresh);
    if (rc < 0)
        return rc;
    rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2, "l2", fresh,
                             work->table, img->cluster_size);
    /* The table, its data and every refcount it needs (deferred ones
     * written now) are on disk before the L1 entry points at it. */
    syncs = img->ws->syncs;
    if (rc == 0)
        rc = qcow2_meta_flush_refcounts(img);
    if (rc == 0 && (img->ws->syncs == syncs || img->ws->data_unsynced))
        rc = qcow2_barrier(img);
    if (rc < 0) {
        (void)qcow2_free_clusters(img, fresh, img->cluster_size);
        return rc;
    }
    rc = qcow2_l1_entry_write(img, work->l1_index, fresh | QCOW_OFLAG_COPIED);
    if (rc < 0)
        return rc;
    work->l2_offset = fresh;
    work->needs_new = 0;
    if (old)
        (void)qcow2_free_clusters(img, old, img->cluster_size);
    return 0;
}

static int commit_in_place(qcow2_image *img, qcow2_l2_work *work)
{
    uint64_t first = work->dirty_first * img->l2_entry_bytes;
    uint64_t length = (work->dirty_end - work->dirty_first) *
                      img->l2_entry_bytes;
    int rc;

    /* Write-back: kept dirty, after the refcounts it needs. */
    if (qcow2_meta_defer_l2(img)) {
        rc = qcow2_l2_cache_store(img, work->l2_offset, work->table, first,
                                  (size_t)length);
        return rc < 0 ? rc : qcow2_meta_l2_after_refcounts(img);
    }
    /* Data and refcounts before the entries: no barrier when every entry
     * is a new cluster past the end of the file where the guest read
     * zeroes (landing first, it still reads zeroes) whose refcount needs
     * none (lazy, or already synced). */
    rc = work->n_released == 0 && work->n_set == work->n_unordered
         ? 0 : qcow2_barrier(img);
    if (rc < 0)
        return rc;
    /* The cached table changes (dirty), is written through, then clean. */
    qcow2_l2_cache_update(img->l2_cache, work->l2_offset, first,
                          work->table + first, (size_t)length);
    rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2, "l2",
                             work->l2_offset + first, work->table + first,
                             (size_t)length);
    if (rc < 0) {
        /* The table on disk may be half old, half new. */
        qcow2_l2_cache_drop(img->l2_cache, work->l2_offset);
        return qcow2_poison(img, rc);
    }
    qcow2_l2_cache_mark_clean(img->l2_cache, work->l2_offset);
    return 0;
}

int qcow2_l2_work_commit(qcow2_image *img, qcow2_l2_work *work)
{
    int rc;

    if (work->dirty_first == work->dirty_end)
        return 0;
    rc = work->needs_new ? commit_new_table(img, work)
                         : commit_in_place(img, work);
    if (rc < 0)
        return rc;
    work->dirty_first = work->dirty_end = 0;
    if (work->n_released == 0)
        return 0;
    /* The references are gone on disk before any refcount drops (a
     * dirty table is written first by the decrease itself). */
    rc = qcow2_meta_defer_l2(img) ? 0 : qcow2_barrier(img);
    if (rc < 0)
        return rc;
    for (size_t i = 0; i < work->n_released; i++)
        release_entry(img, work->released[i]);
    work->n_released = 0;
    return 0;
}

int qcow2_set_l2_entry(qcow2_image *img, uint64_t guest_offset,
                       uint64_t entry, uint64_t bitmap)
{
    qcow2_l2_work work;
    int rc = qcow2_begin_update(img);

    if (rc < 0)
        return rc;
    rc = qcow2_l2_work_begin(img, qcow2_l1_index(img, guest_offset), &work);
    if (rc == 0) {
        qcow2_l2_work_set(img, &work, qcow2_l2_index(img, guest_offset),
                          entry, bitmap);
        rc = qcow2_l2_work_commit(img, &work);
    }
    qcow2_l2_work_end(&work);
    return rc;
}

/* ---- Planning one cluster of a write ------------------------------------ */

/* What a write does to one guest cluster. Offsets are inside the cluster. */
typedef struct cluster_plan {
    int keep;                   /* written in place (COPIED host cluster) */
    uint64_t host;              /* keep: the host cluster */
    uint64_t write_from, write_to;  /* the guest write */
    uint64_t copy_from, copy_to;    /* bytes written: the write plus COW */
    qcow2_l2_desc old;
} cluster_plan;

static int sc_is_normal(const qcow2_l2_desc *d, uint32_t sc)
{
    return (d->normal_mask >> sc) & 1;
}

/* Extended L2: QEMU's calculate_l2_meta. In place, only partial
 * subclusters that hold no data are copied; a new cluster for a shared
 * one copies every allocated subcluster; otherwise the touched
 * subclusters, whole. */
static void plan_subclusters(const qcow2_image *img, cluster_plan *p)
{
    uint32_t bits = img->subcluster_bits;
    uint32_t first = (uint32_t)(p->write_from >> bits);
    uint32_t last = (uint32_t)((p->write_to - 1) >> bits);
    uint32_t alloc = p->old.normal_mask;

    p->copy_from = (uint64_t)first << bits;
    p->copy_to = (uint64_t)(last + 1) << bits;
    if (p->keep) {
        if (sc_is_normal(&p->old, first))
            p->copy_from = p->write_from;
        if (sc_is_normal(&p->old, last))
            p->copy_to = p->write_to;
    } else if (p->old.compressed) {
        p->copy_from = 0;
        p->copy_to = img->cluster_size;
    } else if (p->old.has_host && alloc) {
        p->copy_from = min_u64(first, (uint64_t)__builtin_ctz(alloc)) << bits;
        p->copy_to = max_u64(last + 1, 32u - (uint64_t)__builtin_clz(alloc))
                     << bits;
    }
}

static void plan_cluster(const qcow2_image *img, cluster_plan *p)
{
    const qcow2_l2_desc *d = &p->old;

    p->keep = !d->compressed && d->has_host &&
              (d->entry & QCOW_OFLAG_COPIED);
    p->host = d->host;
    if (img->extended_l2) {
        plan_subclusters(img, p);
    } else if (p->keep && d->normal_mask) {
        p->copy_from = p->write_from;
        p->copy_to = p->write_to;
    } else {
        /* New clusters, and zero clusters kept, are written whole. */
        p->copy_from = 0;
        p->copy_to = img->cluster_size;
    }
}

/* The entry after the write: host | COPIED, subclusters written marked
 * allocated (the other bits kept, a compressed cluster had none). */
static void planned_entry(const qcow2_image *img, const cluster_plan *p,
                          uint64_t host, uint64_t *entry, uint64_t *bitmap)
{
    *entry = host | QCOW_OFLAG_COPIED;
    *bitmap = 0;
    if (img->extended_l2) {
        uint32_t bits = img->subcluster_bits;
        uint32_t mask = sc_range_mask((uint32_t)(p->copy_from >> bits),
                                      (uint32_t)((p->copy_to - 1) >> bits));
        *bitmap = p->old.compressed ? 0 : p->old.bitmap;
        *bitmap |= mask;
        *bitmap &= ~((uint64_t)mask << 32);
    }
}

/* ---- Writing one run of clusters ---------------------------------------- */

/* Consecutive clusters written with one allocation and one pwrite. */
typedef struct write_run {
    uint64_t guest_base;        /* guest offset of the first cluster */
    size_t first, count;        /* plans[first..first+count) */
    int keep;
} write_run;

typedef struct write_job {
    qcow2_image *img;
    const uint8_t *buf;         /* the caller's bytes */
    uint64_t offset;            /* guest offset of buf[0] */
    uint64_t end;               /* offset + length */
    cluster_plan *plans;
    uint64_t chunk_base;        /* guest offset of plans[0]'s cluster */
    int fresh_past_eof;         /* the run's clusters are new and lie past
                                   the end of the file, or in a hole the
                                   allocator made: zero COW bytes need no
                                   write (the file reads zeroes there), as
                                   QEMU zeroes them by fallocate */
    int cow_is_zero;            /* ... and the guest reads zeroes there
                                   now: no COW bytes to read or write */
} write_job;

static int run_continues(const qcow2_image *img, const cluster_plan *prev,
                         const cluster_plan *next)
{
    if (prev->keep != next->keep || prev->copy_to != img->cluster_size ||
        next->copy_from != 0)
        return 0;
    return !next->keep || next->host == prev->host + img->cluster_size;
}

/* Guest bytes [guest, guest + len) to host offset `host`; an encrypted
 * image gets them encrypted (in whole sectors: qcow2_write aligns every
 * write of an encrypted image to 512) through a bounded copy. */
static int write_guest(qcow2_image *img, uint64_t host, uint64_t guest,
                       const uint8_t *buf, size_t len)
{
    uint8_t *copy;
    int rc = 0;

    if (!img->crypto)
        return qcow2_write_data(img, host, buf, len);
    copy = malloc(min_u64(len, CRYPT_CHUNK));
    if (!copy)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (size_t at = 0; rc == 0 && at < len; at += CRYPT_CHUNK) {
        size_t n = (size_t)min_u64(len - at, CRYPT_CHUNK);

        memcpy(copy, buf + at, n);
        rc = qcow2_crypt_data(img, guest + at, host + at, copy, n, 1);
        if (rc == 0)
            rc = qcow2_write_data(img, host + at, copy, n);
    }
    free(copy);
    return rc;
}

/* Guest range [from, to) of a run to host offset `host`: the caller's
 * bytes, the rest read as the guest sees it now (COW). One pwrite, or
 * three for a long run (first cluster, middle straight from the caller's
 * buffer, last cluster) so no bounce buffer grows with the request. */
static int write_range(write_job *job, uint64_t host, uint64_t from,
                       uint64_t to)
{
    qcow2_image *img = job->img;
    uint64_t data_from = max_u64(from, job->offset);
    uint64_t data_to = min_u64(to, job->end);
    uint64_t cs = img->cluster_size;
    uint8_t *bounce;
    int rc;

    if (data_from == from && data_to == to)
        return write_guest(img, host, from, job->buf + (from - job->offset),
                           (size_t)(to - from));
    if (job->cow_is_zero)
        return write_guest(img, host + (data_from - from), data_from,
                           job->buf + (data_from - job->offset),
                           (size_t)(data_to - data_from));
    if (to - from > BOUNCE_MAX) {
        uint64_t head_end = align_up(from + 1, cs);
        uint64_t tail_start = align_up(to, cs) - cs;
        rc = write_range(job, host, from, head_end);
        if (rc == 0 && tail_start > head_end)
            rc = write_range(job, host + (head_end - from), head_end,
                             tail_start);
        if (rc == 0)
            rc = write_range(job, host + (tail_start - from), tail_start, to);
        return rc;
    }
    bounce = malloc((size_t)(to - from));
    if (!bounce)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    rc = qcow2_read_current(img, from, bounce, data_from - from);
    if (rc == 0)
        rc = qcow2_read_current(img, data_to, bounce + (data_to - from),
                                to - data_to);
    if (rc == 0) {
        uint64_t lo = from, hi = to;

        memcpy(bounce + (data_from - from),
               job->buf + (data_from - job->offset),
               (size_t)(data_to - data_from));
        if (job->fresh_past_eof &&
            bytes_all_zero(bounce, (size_t)(data_from - from)))
            lo = data_from;
        if (job->fresh_past_eof &&
            bytes_all_zero(bounce + (data_to - from), (size_t)(to - data_to)))
            hi = data_to;
        rc = write_guest(img, host + (lo - from), lo, bounce + (lo - from),
                         (size_t)(hi - lo));
    }
    free(bounce);
    return rc;
}

/* The host cluster of the run's first cluster: kept, the identity in an
 * external data file, or `count` fresh contiguous clusters. */
static int run_host(write_job *job, const write_run *run, uint64_t *host,
                    int *allocated)
{
    const cluster_plan *p = &job->plans[run->first];

    *allocated = 0;
    if (run->keep) {
        *host = p->host;
        return 0;
    }
    if (qcow2_has_data_file(job->img)) {
        *host = run->guest_base;
        return 0;
    }
    *allocated = 1;
    return qcow2_alloc_clusters(job->img, run->count, host);
}

static int write_one_run(write_job *job, qcow2_l2_work *work,
                         const write_run *run)
{
    qcow2_image *img = job->img;
    uint64_t cs = img->cluster_size;
    const cluster_plan *first = &job->plans[run->first];
    const cluster_plan *last = &job->plans[run->first + run->count - 1];
    uint64_t from = run->guest_base + first->copy_from;
    uint64_t to = run->guest_base + (run->count - 1) * cs + last->copy_to;
    uint64_t host;
    int allocated, run_durable, rc;

    rc = run_host(job, run, &host, &allocated);
    if (rc < 0)
        return rc;
    /* No barrier is owed to the run: holes inside the file (its length
     * synced, so an entry landing before the data reads zeroes and
     * points inside the file) whose refcounts are synced or lazy. Past
     * the end of the file an early entry would point outside it. */
    run_durable = allocated && img->ws->last_alloc_durable &&
                  img->ws->last_alloc_hole;
    job->fresh_past_eof = job->cow_is_zero = 0;
    if (allocated && !img->crypto) {
        uint64_t eof;
        job->fresh_past_eof = img->ws->last_alloc_hole ||
                              (img->data_io->ops->size(img->data_io,
                                                       &eof) == 0 &&
                               host >= eof);
    }
    if (job->fresh_past_eof && !img->backing_name) {
        job->cow_is_zero = 1;
        for (size_t k = 0; k < run->count; k++) {
            const qcow2_l2_desc *old = &job->plans[run->first + k].old;
            if (old->compressed || old->has_host)
                job->cow_is_zero = 0;
        }
    }
    rc = write_range(job, host + first->copy_from, from, to);
    if (rc < 0) {
        /* Nothing references them yet: give them back. */
        if (allocated)
            (void)qcow2_free_clusters(img, host, run->count * cs);
        return rc;
    }
    for (size_t k = 0; k < run->count; k++) {
        const cluster_plan *p = &job->plans[run->first + k];
        uint64_t guest = run->guest_base + k * cs;
        uint64_t entry, bitmap;

        planned_entry(img, p, host + k * cs, &entry, &bitmap);
        if (entry == p->old.entry && bitmap == p->old.bitmap)
            continue;
        qcow2_l2_work_set(img, work, qcow2_l2_index(img, guest), entry,
                          bitmap);
        if (job->cow_is_zero && run_durable)
            work->n_unordered++;
        if (!p->keep && (p->old.compressed || p->old.has_host))
            qcow2_l2_work_release(work, p->old.entry);
    }
    return 0;
}

/* One L2 table's share of the write: plan every cluster, write the runs,
 * then commit the table once. */
static int write_chunk(write_job *job, uint64_t start, uint64_t end)
{
    qcow2_image *img = job->img;
    uint64_t cs = img->cluster_size;
    uint64_t base = start & ~(cs - 1);
    size_t n = (size_t)((align_up(end, cs) - base) >> img->cluster_bits);
    qcow2_l2_work work;
    int rc;

    rc = qcow2_l2_work_begin_range(img, qcow2_l1_index(img, start),
                                   qcow2_l2_index(img, base), n, &work);
    job->plans = rc == 0 ? calloc(n, sizeof *job->plans) : NULL;
    if (rc == 0 && !job->plans)
        rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        cluster_plan *p = &job->plans[i];
        uint64_t guest = base + i * cs;

        p->write_from = max_u64(start, guest) - guest;
        p->write_to = min_u64(end, guest + cs) - guest;
        rc = qcow2_l2_work_get(img, &work, qcow2_l2_index(img, guest),
                               &p->old);
        if (rc == 0)
            plan_cluster(img, p);
    }
    for (size_t i = 0; rc == 0 && i < n;) {
        write_run run = { base + i * cs, i, 1, job->plans[i].keep };

        while (i + run.count < n &&
               run_continues(img, &job->plans[i + run.count - 1],
                             &job->plans[i + run.count]))
            run.count++;
        rc = write_one_run(job, &work, &run);
        i += run.count;
    }
    if (rc == 0)
        rc = qcow2_l2_work_commit(img, &work);
    free(job->plans);
    job->plans = NULL;
    qcow2_l2_work_end(&work);
    return rc;
}

static int write_raw_image(qcow2_image *img, uint64_t offset,
                           const void *buf, size_t length)
{
    qcow2_io_set_label(img->io, "data");
    int rc = img->io->ops->pwrite(img->io, buf, length, offset);
    if (rc < 0)
        return qcow2_fail(img, rc, "write of %zu bytes at 0x%llx failed",
                          length, (unsigned long long)offset);
    return 0;
}

static int write_qcow2(qcow2_image *img, uint64_t offset, const void *buf,
                       size_t length)
{
    uint64_t coverage, end;
    write_job job;
    int rc = qcow2_begin_update(img);

    if (rc < 0)
        return rc;
    memset(&job, 0, sizeof job);
    job.img = img;
    job.buf = buf;
    job.offset = offset;
    job.end = offset + length;
    coverage = qcow2_l2_coverage(img);
    for (uint64_t at = offset; at < job.end && rc == 0; at = end) {
        end = min_u64(job.end, (at / coverage + 1) * coverage);
        rc = write_chunk(&job, at, end);
    }
    return rc;
}

/* One partial sector of an encrypted image: read, patched, written whole
 * (QEMU too makes encrypted requests sector aligned). */
static int write_partial_sector(qcow2_image *img, uint64_t offset,
                                const uint8_t *buf, size_t length)
{
    uint8_t sector[QCOW2_CRYPTO_SECTOR];
    uint64_t start = offset - offset % QCOW2_CRYPTO_SECTOR;
    int rc = qcow2_read_current(img, start, sector, sizeof sector);

    if (rc < 0)
        return rc;
    memcpy(sector + (offset - start), buf, length);
    return write_qcow2(img, start, sector, sizeof sector);
}

/* An encrypted image: a partial head and tail sector, whole sectors
 * between. */
static int write_encrypted(qcow2_image *img, uint64_t offset,
                           const uint8_t *buf, size_t length)
{
    uint64_t end = offset + length;
    uint64_t head_end = min_u64(align_up(offset, QCOW2_CRYPTO_SECTOR), end);
    uint64_t tail = max_u64(end - end % QCOW2_CRYPTO_SECTOR, head_end);
    int rc = 0;

    if (head_end > offset)
        rc = write_partial_sector(img, offset, buf, (size_t)(head_end -
                                                             offset));
    if (rc == 0 && tail > head_end)
        rc = write_qcow2(img, head_end, buf + (head_end - offset),
                         (size_t)(tail - head_end));
    if (rc == 0 && end > tail)
        rc = write_partial_sector(img, tail, buf + (tail - offset),
                                  (size_t)(end - tail));
    return rc;
}

static int write_call(qcow2_image *img, uint64_t offset, const void *buf,
                      size_t length)
{
    int rc = qcow2_check_writable(img);

    if (rc < 0)
        return rc;
    if (!range_inside(offset, length, img->size))
        return qcow2_fail(img, QCOW2_E_INVALID, "write of %zu bytes at "
                          "0x%llx is outside the disk (size 0x%llx)",
                          length, (unsigned long long)offset,
                          (unsigned long long)img->size);
    if (length == 0)
        return 0;
    if (img->is_raw)
        return write_raw_image(img, offset, buf, length);
    if (img->crypto)
        return write_encrypted(img, offset, buf, length);
    return write_qcow2(img, offset, buf, length);
}

int qcow2_write(qcow2_image *img, uint64_t offset, const void *buf,
                size_t length)
{
    int rc;

    qcow2_call_begin(img);
    rc = write_call(img, offset, buf, length);
    return qcow2_call_end(img, rc);
}
