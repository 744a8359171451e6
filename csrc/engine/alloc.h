/*
 * Allocation and refcounts (layer 6): refcount updates, cluster and byte
 * allocation, refcount-table growth (alloc.c), the allocator's refcount
 * reads (refcount_scan.c) and a writable handle's state (write_state.c).
 *
 * Crash-safe order, always: guest data -> refcount increase (flushed) ->
 * L2 entry (flushed) -> L1 entry; frees in the reverse order (the
 * reference goes first, flushed, then the refcount drops).
 */
#ifndef QCOW2_ALLOC_H
#define QCOW2_ALLOC_H

#include "read_path.h"

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

/* ---- write_state.c --------------------------------------------------------- */
/* Make the handle writable: state, lazy refcounts (sets the dirty bit before
 * the first deferred update), unknown autoclear bits cleared. Called by
 * qcow2_open for read_write and by qcow2_create. */
int qcow2_write_state_init(qcow2_image *img, const qcow2_open_opts *opts);
/* Flush, clear the dirty bit when everything is on disk, release. */
int qcow2_write_state_close(qcow2_image *img);

/* ---- alloc.c, refcount_scan.c, write_state.c -------------------------- */
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

/* ---- write_state.c: shared by the writers of layers 7 and 8 ------------- */
/* QCOW2_E_READONLY on read-only handles and views; the poison status on a
 * poisoned handle. */
int qcow2_check_writable(qcow2_image *img);
/* QCOW2_E_READONLY on read-only handles and views, the poison status on a
 * poisoned handle; with lazy refcounts, sets the dirty bit (synced) before
 * the first metadata update. */
int qcow2_begin_update(qcow2_image *img);
/* Writethrough's reserved clusters (see alloc.c) given back: 0 or the
 * refcount update's failure. */
int qcow2_alloc_give_back(qcow2_image *img);
/* Around each guest write call (write, write_zeroes, discard,
 * write_compressed): in writethrough mode the outermost call ends with a
 * sync, so that it is durable on return. call_end returns rc, or the
 * sync's failure. */
void qcow2_call_begin(qcow2_image *img);
int qcow2_call_end(qcow2_image *img, int rc);

/* ---- What refcount_scan.c (reading refcount blocks for the allocator)
 * gives alloc.c (writing them): spans of refcount-block entries, validated
 * refcount-table lookups and the free-cluster search. Calls go one way,
 * from alloc.c down to refcount_scan.c. */

#define REFTABLE_MAX_ENTRIES  (QCOW2_MAX_REFTABLE_BYTES / 8)

/* Some entries of one refcount block, held as the bytes that store them
 * and packed by the image's refcount codec (refcount_codec.c). */
typedef struct refblock_span {
    uint64_t block_offset;      /* host offset of the refcount block */
    uint64_t first;             /* first entry (index inside the block) */
    uint64_t count;             /* entries */
    uint64_t byte_start;        /* byte of the block holding `first` */
    size_t byte_len;
    uint64_t first_in_bytes;    /* the entry bytes[0] starts with */
    uint8_t *bytes;             /* byte_len bytes */
    const qcow2_refcount_codec *codec;
} refblock_span;

/* ---- refcount_scan.c ---------------------------------------------------- */
/* A span over entries [first, first+count) of the block at block_offset,
 * stored in `bytes` (at least 8 + count * bits / 8 bytes). */
void alloc_span_init(const qcow2_image *img, uint64_t block_offset,
                     uint64_t first, uint64_t count, uint8_t *bytes,
                     refblock_span *span);
uint64_t alloc_span_get(const refblock_span *span, uint64_t entry);
void alloc_span_set(refblock_span *span, uint64_t entry, uint64_t value);
int alloc_span_load(qcow2_image *img, refblock_span *span);
/* The refcount block of reftable entry `index` (0: none, or past the
 * table), validated before use. */
int alloc_refblock_at(qcow2_image *img, uint64_t index, uint64_t *block);
/* The last host cluster an entry can name (56-bit offsets). */
uint64_t alloc_max_host_cluster(const qcow2_image *img);
/* First fit: the first run of `count` clusters with refcount 0 at or
 * after *from, which ends just past the run. */
int alloc_find_free_run(qcow2_image *img, uint64_t *from, uint64_t count,
                        uint64_t *start);

#endif
