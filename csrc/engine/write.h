/*
 * The write engine's shared state and internal API (issue: write engine).
 *
 * Crash-safe order, always: guest data -> refcount increase (flushed) ->
 * L2 entry (flushed) -> L1 entry; frees in the reverse order (the
 * reference goes first, flushed, then the refcount drops). Every write goes
 * through qcow2_write_checked so the overlap check, the trace label and
 * handle poisoning are applied in one place.
 *
 *   alloc.c         refcount updates of any width, cluster and byte
 *                   allocation, refcount table growth, frees
 *   overlap.c       metadata overlap check, checked writes, poisoning
 *   header_write.c  header/extension serialization, feature-bit updates
 *   create.c        qcow2_create_layout (every option, preallocation)
 *   resize.c        qcow2_resize (grow, shrink where QEMU allows)
 *   write.c         guest writes, COW, zero writes, discard, compressed
 *                   writes, flush, lazy-refcount dirty bit
 */
#ifndef QCOW2_WRITE_H
#define QCOW2_WRITE_H

#include "internal.h"
#include "io_fault.h"
#include "l1_write.h"   /* L1 growth, preallocation (layer 7) */

/* Structures the overlap check guards (QEMU's QCOW2_OL_* in spirit). */
enum qcow2_overlap {
    OVERLAP_HEADER          = 1 << 0,
    OVERLAP_ACTIVE_L1       = 1 << 1,
    OVERLAP_ACTIVE_L2       = 1 << 2,
    OVERLAP_REFCOUNT_TABLE  = 1 << 3,
    OVERLAP_REFCOUNT_BLOCK  = 1 << 4,
    OVERLAP_SNAPSHOT_TABLE  = 1 << 5,
    OVERLAP_INACTIVE_L1     = 1 << 6,
    OVERLAP_INACTIVE_L2     = 1 << 7,
    OVERLAP_BITMAP_DIR      = 1 << 8,
    OVERLAP_CRYPTO_HEADER   = 1 << 9,
};
#define OVERLAP_CONSTANT  (OVERLAP_HEADER | OVERLAP_ACTIVE_L1 | \
                           OVERLAP_REFCOUNT_TABLE | OVERLAP_SNAPSHOT_TABLE | \
                           OVERLAP_INACTIVE_L1 | OVERLAP_CRYPTO_HEADER | \
                           OVERLAP_BITMAP_DIR)
#define OVERLAP_CACHED    (OVERLAP_CONSTANT | OVERLAP_ACTIVE_L2 | \
                           OVERLAP_REFCOUNT_BLOCK)
#define OVERLAP_ALL       (OVERLAP_CACHED | OVERLAP_INACTIVE_L2)

typedef struct qcow2_write_state {
    uint64_t free_cluster_hint;  /* lowest cluster index that may be free */
    uint64_t free_byte_offset;   /* compressed packing: next free byte in
                                    the last compressed host cluster, 0 =
                                    start a new one */
    int lazy_refcounts;          /* runtime option: refcount updates of
                                    data clusters may lag, dirty bit set */
    int dirty_on_disk;           /* the dirty bit is set in the file */
    int overlap_checks;          /* OVERLAP_* mask (default CACHED) */
    int discard_passthrough;     /* runtime "discard" option */
    int poisoned;                /* a metadata write failed midway: every
                                    later call fails with `poison` */
    qcow2_error poison;
} qcow2_write_state;

/* ---- overlap.c ---------------------------------------------------------- */
/* 0, or QCOW2_E_CORRUPT when [offset, offset+length) hits a structure in
 * img->ws->overlap_checks other than those in `ignore` (the structure being
 * written); the image is then marked corrupt (incompatible bit 1). */
int qcow2_overlap_check(qcow2_image *img, int ignore, uint64_t offset,
                        uint64_t length);
/* The structure (enum qcow2_overlap) such a write would hit, or 0; marks
 * nothing (check -r all skips a repair that would overwrite metadata). */
int qcow2_overlap_find(qcow2_image *img, int ignore, uint64_t offset,
                       uint64_t length);
/* Every write of the engine: overlap check (ignore mask), trace label
 * `what`, pwrite; a failure is returned with a message naming `what`. */
int qcow2_write_checked(qcow2_image *img, int ignore, const char *what,
                        uint64_t offset, const void *buf, size_t length);
/* fsync of the data file, then of the image file: what img:flush() and
 * close promise. */
int qcow2_sync(qcow2_image *img);
/* qcow2_sync as a barrier between dependent steps (a no-op only in the
 * test build with QCOW2_TEST_NO_BARRIER). */
int qcow2_barrier(qcow2_image *img);
/* Poison the handle after a half-done metadata update; returns code. */
int qcow2_poison(qcow2_image *img, int code);

/* ---- alloc.c ------------------------------------------------------------ */
/* Read one refcount (any width) — the engine-side reader is qcow2_refcount
 * in refcount.c; these are the writers. */
/* Add delta to the refcount of every host cluster touched by
 * [offset, offset+length). Refuses to go below 0 or above the width's
 * maximum (QCOW2_E_CORRUPT / QCOW2_E_UNSUPPORTED, nothing changed). New
 * refcount blocks and refcount-table growth happen here, in crash-safe
 * order. Refcount blocks are written (not flushed): call qcow2_barrier
 * before writing anything that depends on an increase. A cluster reaching
 * 0 lowers free_cluster_hint. */
int qcow2_refcount_update(qcow2_image *img, uint64_t offset, uint64_t length,
                          int64_t delta);
/* Allocate `count` contiguous free clusters (refcount 0 -> 1), first fit
 * from the lowest free cluster, as QEMU does; the file grows as needed.
 * *host_offset gets the first cluster's offset. */
int qcow2_alloc_clusters(qcow2_image *img, uint64_t count,
                         uint64_t *host_offset);
/* Allocate `length` bytes for a compressed stream (packed after the
 * previous stream where it fits; a stream may not cross into a cluster
 * that is not freshly allocated and contiguous). Refcount +1 on each host
 * cluster touched. */
int qcow2_alloc_bytes(qcow2_image *img, uint64_t length,
                      uint64_t *host_offset);
/* Refcount -1 on every cluster of [offset, offset+length). */
int qcow2_free_clusters(qcow2_image *img, uint64_t offset, uint64_t length);
/* Total host clusters covered by the refcount table. */
uint64_t qcow2_refcount_coverage(const qcow2_image *img);

/* ---- refcount_cache.c (added by the refcount-cache work) --------------
 * The cache is write-through (nothing dirty, ever): refcount increases
 * are on disk when qcow2_refcount_update returns, so the barrier before a
 * dependent L2 entry is what flushes refcount blocks before the L2 tables
 * that depend on them. */
/* A whole block just written (cluster_size bytes): keep it, saving the
 * read that would follow. Best effort. */
void qcow2_refcount_cache_install(qcow2_image *img, uint64_t block_offset,
                                  const void *block);
/* Forget one block / every block: after writes that bypass
 * qcow2_write_checked (raw writes) or a refcount-table switch. */
void qcow2_refcount_cache_drop(qcow2_image *img, uint64_t block_offset);
void qcow2_refcount_cache_drop_all(qcow2_image *img);

/* ---- header_write.c ----------------------------------------------------- */
/* Serialize img->hdr, every extension (unknown ones kept) and the backing
 * name into cluster 0 and write it (one write), then barrier. Fails with
 * QCOW2_E_INVALID when they do not fit in cluster 0. */
int qcow2_header_rewrite(qcow2_image *img);
/* Set or clear an incompatible/compatible/autoclear bit with one synced
 * 8-byte write (v3 only). kind: 0 incompatible, 1 compatible, 2 autoclear. */
int qcow2_header_set_feature(qcow2_image *img, int kind, int bit, int on);
/* The three 12-byte pointer pairs QEMU switches in one write each. */
int qcow2_header_set_l1(qcow2_image *img, uint64_t l1_offset,
                        uint32_t l1_size);
int qcow2_header_set_reftable(qcow2_image *img, uint64_t offset,
                              uint32_t clusters);
int qcow2_header_set_snapshots(qcow2_image *img, uint64_t offset,
                               uint32_t count);
int qcow2_header_set_size(qcow2_image *img, uint64_t size);

/* ---- write.c ------------------------------------------------------------- */
/* Make the handle writable: state, lazy refcounts (sets the dirty bit before
 * the first deferred update), unknown autoclear bits cleared. Called by
 * qcow2_open for read_write and by qcow2_create. */
int qcow2_write_state_init(qcow2_image *img, const qcow2_open_opts *opts);
/* Flush, clear the dirty bit when everything is on disk, release. */
int qcow2_write_state_close(qcow2_image *img);
/* Set the entry of one guest cluster in its L2 table (allocating the L2
 * table and its L1 entry when missing, COWing a shared L2 table). */
int qcow2_set_l2_entry(qcow2_image *img, uint64_t guest_offset,
                       uint64_t entry, uint64_t bitmap);

/* ---- create.c: the new image laid out and closed again (qcow2_create,
 * image.c, opens it). Errors as qcow2_create's, in err (not NULL). */
int qcow2_create_layout(const char *path, const qcow2_create_opts *opts,
                        qcow2_error *err);

/* ---- Added for alloc.c overlap.c header_write.c create.c resize.c ------- */
/* Guest data bytes at host offset of img->data_io: through
 * qcow2_write_checked (label "data") when data lives in the image file;
 * straight to the external data file otherwise (no metadata to hit). */
int qcow2_write_data(qcow2_image *img, uint64_t offset, const void *buf,
                     size_t length);
/* QEMU's qcow2_refcount_area: a new refcount table (and the refcount
 * blocks still missing) placed at start_offset (cluster aligned, free up
 * to the end of the file), sized to cover start_offset plus
 * additional_clusters (exact, or with QEMU's 50% headroom), the block at
 * new_block_offset hooked at new_block_index when non-zero; blocks
 * written, barrier, table written, barrier, header switched, old table
 * freed. *end_offset gets the first byte after the new structures. */
int qcow2_refcount_area(qcow2_image *img, uint64_t start_offset,
                        uint64_t additional_clusters, int exact,
                        uint64_t new_block_index, uint64_t new_block_offset,
                        uint64_t *end_offset);
/* The refcount of one host cluster, read through the refcount-block cache: 0
 * past the refcount table or under an empty entry. */
int qcow2_refcount_get(qcow2_image *img, uint64_t host_cluster,
                       uint64_t *refcount);
/* Index of the last host cluster with a non-zero refcount below
 * `clusters` (QEMU's qcow2_get_last_cluster), or -1 when none. */
int qcow2_last_used_cluster(qcow2_image *img, uint64_t clusters,
                            int64_t *last);
/* Reserve clusters [offset, offset+count*cluster_size) that must all be
 * free (refcount 0 -> 1), the refcount blocks they need created first
 * (QEMU's qcow2_alloc_clusters_at for whole free ranges). */
int qcow2_alloc_clusters_at(qcow2_image *img, uint64_t offset,
                            uint64_t count);
/* A fresh write state with QEMU's defaults (overlap checks "cached",
 * free_cluster_hint 0): create.c uses it on its bootstrap handle. */
void qcow2_write_state_defaults(qcow2_write_state *ws);
/* *unused = 1 when refcount block `index` exists and counts nothing but
 * (possibly) itself: QEMU's qcow2_shrink_reftable drops those. */
int qcow2_refblock_unused(qcow2_image *img, uint64_t index, int *unused);

/* ---- Shared by write.c write_state.c zero.c compressed_write.c ---------- */
/* QCOW2_E_READONLY on read-only handles and views; the poison status on a
 * poisoned handle. */
int qcow2_check_writable(qcow2_image *img);
/* QCOW2_E_READONLY on read-only handles and views, the poison status on a
 * poisoned handle; with lazy refcounts, sets the dirty bit (synced) before
 * the first metadata update. */
int qcow2_begin_update(qcow2_image *img);
/* Decoded L2 entry of one cluster (QEMU's cluster and subcluster types). */
typedef struct qcow2_l2_desc {
    uint64_t entry, bitmap;     /* word 0, word 1 (extended L2, else 0) */
    int compressed;
    int has_host;               /* a host cluster is referenced */
    uint64_t host;              /* its offset (cluster aligned) */
    uint32_t normal_mask;       /* subclusters holding data */
    uint32_t zero_mask;         /* subclusters reading as zeroes */
} qcow2_l2_desc;
/* One L2 table being changed: a private copy of it, written back by
 * commit in crash-safe order (a table that is missing or shared is made
 * at fresh clusters and hooked into the L1 table). */
typedef struct qcow2_l2_work {
    uint32_t l1_index;
    uint64_t l2_offset;         /* the table on disk, 0 = none yet */
    int needs_new;              /* missing or shared: commit allocates */
    uint8_t *table;             /* one cluster, big-endian as on disk */
    uint64_t dirty_first, dirty_end;    /* entries changed */
    uint64_t *released;         /* old entries to drop after commit */
    size_t n_released;
} qcow2_l2_work;
int qcow2_l2_work_begin(qcow2_image *img, uint32_t l1_index,
                        qcow2_l2_work *work);
/* Decode entry l2_index (QCOW2_E_CORRUPT naming it when invalid). */
int qcow2_l2_work_get(qcow2_image *img, const qcow2_l2_work *work,
                      uint64_t l2_index, qcow2_l2_desc *desc);
void qcow2_l2_work_set(qcow2_image *img, qcow2_l2_work *work,
                       uint64_t l2_index, uint64_t entry, uint64_t bitmap);
/* Remember an old entry whose host range loses a reference after commit. */
void qcow2_l2_work_release(qcow2_l2_work *work, uint64_t old_entry);
/* barrier, the table (new tables: barrier, L1 entry), barrier, then the
 * released references dropped. A failed table or L1 write poisons. */
int qcow2_l2_work_commit(qcow2_image *img, qcow2_l2_work *work);
void qcow2_l2_work_end(qcow2_l2_work *work);
/* Guest bytes as they read now, zeroes past the virtual size (COW). */
int qcow2_read_current(qcow2_image *img, uint64_t guest_offset, void *buf,
                       uint64_t length);
/* The L1 index and L2 index of a guest offset. */
uint32_t qcow2_l1_index(const qcow2_image *img, uint64_t guest_offset);
uint64_t qcow2_l2_index(const qcow2_image *img, uint64_t guest_offset);
/* Guest bytes one L2 table maps. */
uint64_t qcow2_l2_coverage(const qcow2_image *img);
int qcow2_has_data_file(const qcow2_image *img);

/* ---- switch.c: whole-state switches (snapshot create/apply/delete) ---- */
/* One synced 36-byte write of header bytes 36..71: the active L1, the
 * refcount table and the snapshot table switched together; img->hdr
 * updated on success. */
int qcow2_header_switch_all(qcow2_image *img, uint64_t l1_offset,
                            uint32_t l1_size, uint64_t reftable_offset,
                            uint32_t reftable_clusters,
                            uint64_t snapshots_offset, uint32_t nb_snapshots);
/* The references of the new state, per host cluster, and where the new
 * structures go (fresh clusters past the file and every reference). */
typedef struct qcow2_switch {
    qcow2_image *img;
    uint64_t *counts;           /* references per host cluster */
    uint64_t capacity;          /* entries of counts */
    uint64_t nb_clusters;       /* entries in use */
    uint64_t next;              /* next fresh cluster */
    uint64_t old_file_size;
    int switched;               /* the header write was attempted */
} qcow2_switch;
/* Count every reference of the image as it is (the check walk), the
 * refcount structure left out (it is rebuilt). Refuses images the walk
 * finds corrupt. */
int qcow2_switch_begin(qcow2_image *img, qcow2_switch *sw);
/* delta on the count of every cluster [offset, offset+length) touches. */
int qcow2_switch_add(qcow2_switch *sw, uint64_t offset, uint64_t length,
                     int64_t delta);
/* `clusters` fresh clusters, counted 1 each. */
int qcow2_switch_alloc(qcow2_switch *sw, uint64_t clusters,
                       uint64_t *offset);
/* delta on every L2 table of l1 and every cluster those reference. */
int qcow2_switch_tree(qcow2_switch *sw, const uint64_t *l1, uint32_t l1_size,
                      int64_t delta);
/* l1 becomes the new active L1: +1 on its tree, COPIED bits recomputed
 * from the final counts; a table whose bits change is copied to a fresh
 * cluster (written, not synced) and l1 updated (COPIED included). */
int qcow2_switch_active_tree(qcow2_switch *sw, uint64_t *l1,
                             uint32_t l1_size);
/* l1 at fresh clusters (written, not synced); an empty table keeps the
 * current offset. */
int qcow2_switch_write_l1(qcow2_switch *sw, const uint64_t *l1,
                          uint32_t l1_size, uint64_t *offset);
/* New refcount structure from the counts, barrier, the header switched in
 * one synced write (with the virtual size when it changes: 48 bytes from
 * 24), then img's L1, refcount table, snapshots, size and caches follow. */
int qcow2_switch_commit(qcow2_switch *sw, uint64_t l1_offset,
                        const uint64_t *l1, uint32_t l1_size,
                        uint64_t snapshots_offset, uint32_t nb_snapshots,
                        uint64_t size);
/* Release; without a switch, what was written past the old end of the
 * file is cut off again. */
void qcow2_switch_end(qcow2_switch *sw);

/* write.c: one active L1 entry written (synced) and mirrored in memory; a
 * failure poisons the handle, the metadata update being half done. */
int qcow2_l1_entry_write(qcow2_image *img, uint32_t l1_index,
                         uint64_t entry);

#endif /* QCOW2_WRITE_H */
