/*
 * The write funnel (layer 2, overlap.c): every write of the engine goes
 * through qcow2_write_checked, so the overlap check, the trace label, the
 * write observer and handle poisoning are applied in one place; barriers
 * between dependent steps. The write state lives here because the funnel
 * reads it (overlap checks, poison); write_state.c (layer 6) fills it.
 */
#ifndef QCOW2_OVERLAP_H
#define QCOW2_OVERLAP_H

#include "internal.h"
#include "io_fault.h"
#include "meta_io.h"

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
    int no_sync;                 /* cache "unsafe" (convert's output, as
                                    qemu-img convert's default -t unsafe):
                                    syncs and barriers do nothing */
    /* The cache mode (issue 14). meta_write_back: "writeback" or "unsafe":
     * L2 tables and refcount blocks stay dirty in their caches until a
     * flush, an eviction or close (cache_flush.c orders them). Lazy
     * refcounts defer refcount blocks in any mode. hold > 0: an operation
     * that reads or rewrites metadata behind the caches, or builds
     * refcount structures, runs write-through (the caches flushed first). */
    int meta_write_back;
    int hold;
    int call_depth;              /* guest write calls in progress */
    int data_unsynced;           /* data written since the last sync: a
                                    barrier comes before any L2 table
                                    write-back (data before the entry) */
    uint64_t syncs;              /* flush pairs issued (stats) */
    uint64_t cache_flushes;      /* write-backs of both caches (stats) */
    /* Buffers a write reuses instead of allocating them per call (a use
     * nested in another takes a fresh one): an L2 work's table copy and
     * released list, a refcount update's block bytes. */
    void *spare_table, *spare_released, *spare_block;
    /* Writethrough's batch of counted, unreferenced clusters (alloc.c):
     * reserved_count of them from reserved_first; durable once syncs has
     * passed reserved_sync_mark. give_back returns them (set once a batch
     * exists; cache_flush.c calls it before any flush or hold). */
    int reserve_batches;         /* set by an open in writethrough mode */
    uint64_t reserved_first, reserved_count, reserved_sync_mark;
    int reserved_holes;          /* the batch was past the end of the
                                    file, which grew over it: holes */
    int last_alloc_durable;      /* the last allocation came from a batch
                                    a sync has followed */
    int last_alloc_hole;         /* ... and its clusters are holes */
    int (*give_back)(struct qcow2_image *img);
    int poisoned;                /* a metadata write failed midway: every
                                    later call fails with `poison` */
    qcow2_error poison;
    struct qcow2_overlap_index *index;  /* while held (overlap.c): sorted
                                           offsets the check searches */
} qcow2_write_state;

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
/* Hold (or release) sorted indexes of the L2 tables the active L1 lists
 * and of the refcount blocks, so that each check costs O(log n), not a
 * scan of both tables: a pass that writes once per entry of a hostile
 * table (check -r all) would otherwise take time quadratic in its size.
 * The indexes follow every change made through qcow2_write_checked
 * (tables are mirrored in memory right after their write); holds nest.
 * Without memory for them the check simply scans. */
void qcow2_overlap_index_hold(qcow2_image *img);
void qcow2_overlap_index_release(qcow2_image *img);
/* A buffer of `size` bytes: the spare in *slot (always of that size for
 * the handle) or a new one; NULL without memory. Given back, it becomes
 * the spare again, or is freed when there is one. */
void *qcow2_spare_take(void **slot, size_t size);
void qcow2_spare_give(void **slot, void *buf);
/* fsync of the data file, then of the image file: what img:flush() and
 * close promise (nothing when ws->no_sync). */
int qcow2_sync(qcow2_image *img);
/* qcow2_sync as a barrier between dependent steps (a no-op only in the
 * test build with QCOW2_TEST_NO_BARRIER). */
int qcow2_barrier(qcow2_image *img);
/* Poison the handle after a half-done metadata update; returns code. */
int qcow2_poison(qcow2_image *img, int code);
/* Guest data bytes at host offset of img->data_io: through
 * qcow2_write_checked (label "data") when data lives in the image file;
 * straight to the external data file otherwise (no metadata to hit). */
int qcow2_write_data(qcow2_image *img, uint64_t offset, const void *buf,
                     size_t length);

#endif /* QCOW2_OVERLAP_H */
