/*
 * qemu-img check (layer 8), in four floors: check.c (the driver: passes,
 * comparison, leak repair, repair steps in order) calls check_walk.c (the
 * walk over every structure that references host clusters) and repair.c
 * (the repair steps); the driver and the walk call check_copied.c (the
 * COPIED flags of the active tables); all of them call check_read.c (the
 * file as check reads it: tables in runs, refcount blocks kept) and
 * check_state.c (in-memory refcounts, findings). Nothing calls up.
 *
 * Memory stays bounded by what the file holds: the in-memory refcounts,
 * an L1 table at a time, one window of L2 tables (CHECK_RUN_BYTES) and the
 * refcount blocks kept (CHECK_REFBLOCK_BYTES), whatever the tables say.
 *
 * The in-memory refcount table ("IMRT" in QEMU) is sized by the file, not
 * by the virtual disk: a reference that runs one cluster or more past the
 * end of the file is reported and not counted (QEMU's rule), so the array
 * never needs more than file clusters + 1 entries.
 */
#ifndef QCOW2_CHECK_H
#define QCOW2_CHECK_H

#include "ops.h"

/* At most this many findings are kept; the counts stay exact. */
#define CHECK_MAX_FINDINGS      10000u
/* QEMU refuses files of more clusters (nb_clusters > INT_MAX, EFBIG). */
#define CHECK_MAX_CLUSTERS      0x7fffffffull

/* Extra data a version 3 snapshot entry must have (vm_state_size_large
 * and disk_size); less is an "incomplete" entry. */
#define CHECK_SNAPSHOT_EXTRA_V3 16u

/* QEMU measures the image file in 512-byte sectors (bdrv_getlength), so
 * the length references are judged against is the file size rounded up
 * to 512: a snapshot table ending up to 511 bytes further past the end of
 * the file is still counted. */
static inline uint64_t check_file_length(uint64_t file_size)
{
    return align_up(file_size, 512);
}

/* check_read.c's bounds: the L2 tables of one run-read window, and the
 * refcount blocks kept (at least one of each, whatever the cluster size). */
#define CHECK_RUN_BYTES         (1u << 20)
#define CHECK_REFBLOCK_BYTES    (4u << 20)

/* QEMU's CHECK_FRAG_INFO: the walk of the active L1 fills the statistics. */
#define CHECK_FRAG_INFO         0x2

typedef struct check_state {
    qcow2_image *img;
    qcow2_check_result *res;
    int repair;                 /* enum qcow2_repair_mode */
    int has_data_file;          /* data clusters are not refcounted */

    uint64_t file_size;         /* the image file at the start, as QEMU
                                   measures it (check_file_length) */
    uint32_t *counts;           /* references per host cluster */
    uint64_t capacity;          /* entries of counts (file clusters + 1) */
    uint64_t nb_clusters;       /* entries compared: file clusters, grown
                                   by references < 1 cluster past EOF */
    uint64_t count_max;         /* the refcount width's maximum, capped */

    uint64_t *active_l1;        /* the active L1 as read from the file */
    uint32_t active_l1_size;

    /* Refcount blocks kept for the on-disk reader (check_read.c): a
     * direct-mapped set, slot = reftable index % refblock_slots, in one
     * buffer (a run of blocks next to each other in the file is one read). */
    uint8_t *refblocks;
    uint64_t *refblock_tags;    /* reftable index held per slot, or
                                   UINT64_MAX */
    uint32_t refblock_slots;    /* a power of two */
    uint32_t refblock_shift;    /* log2 of img->refblock_entries */
    uint32_t refblock_order;    /* the refcount order */
    int refcounts_dead;         /* an unaligned refcount block was met:
                                   QEMU then fails every later read */
    /* The COPIED check done by the walk of the active tables
     * (check_copied.c): asked for, given up, its findings set aside. */
    int copied_in_walk;
    int copied_given_up;
    qcow2_check_result copied_aside;
    /* COPIED mismatches against the on-disk refcounts (reported) and
     * against the counted references (what -r all's pass would see once
     * it has fixed the refcounts, as QEMU checks COPIED after fixing). */
    uint64_t copied_vs_disk;
    uint64_t copied_vs_counted;
    /* Refcount blocks past the end of the file: -r all grows the file over
     * them, and each then counts once more, referenced with refcount 0. */
    uint64_t refblocks_outside;
} check_state;

/* Slots of the refcount-block set: CHECK_REFBLOCK_BYTES of blocks, at
 * least one, no more than the refcount table has entries. */
static inline uint32_t check_refblock_slots(const qcow2_image *img)
{
    uint64_t slots = img->cluster_size >= CHECK_REFBLOCK_BYTES
                         ? 1 : CHECK_REFBLOCK_BYTES / img->cluster_size;

    if (slots > img->reftable_entries)
        slots = img->reftable_entries;
    while (slots & (slots - 1))     /* a power of two: slot by mask */
        slots &= slots - 1;
    return slots ? (uint32_t)slots : 1;
}

/* 1 when the n bytes at p (a multiple of 8) are all zero: 8 L2 entries
 * at once, as most of a sparse image's tables are. */
static inline int check_bytes_zero(const uint8_t *p, size_t n)
{
    uint64_t any = 0;

    for (size_t k = 0; k < n; k += 8) {
        uint64_t word;
        memcpy(&word, p + k, 8);
        any |= word;
    }
    return any == 0;
}

/* L2 tables of one L1 table handed out in L1 order, read a window at a
 * time (check_read.c). */
typedef struct check_tables {
    check_state *st;
    const uint64_t *l1;
    uint32_t l1_size;
    int any_bits;               /* an entry is followed when it is not 0
                                   (else: when its offset is not 0) */
    uint32_t slots;             /* tables a window holds */
    uint8_t *buf;               /* slots tables, in host-offset order */
    struct table_ref *refs;     /* the window sorted by offset */
    uint32_t *slot_of;          /* per window entry (L1 order): its slot */
    uint32_t *index_of;         /* per window entry: its L1 index */
    uint8_t *loaded;            /* per slot: read by the run read */
    uint32_t first, end;        /* the window's L1 indexes [first, end) */
    uint32_t count, next;       /* entries in the window, the next one */
} check_tables;

/* ---- check_state.c: the shared state ------------------------------------ */
/* Record a finding (kind: enum qcow2_finding_kind); counts are the
 * caller's business. offset is the host offset it is about. */
void check_note(check_state *st, int kind, uint64_t offset, const char *fmt,
                ...) __attribute__((format(printf, 4, 5)));
/* corruptions++ and a finding. */
void check_corrupt(check_state *st, uint64_t offset, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* QEMU's qcow2_inc_refcounts_imrt: +1 on every cluster [offset,
 * offset+size) touches. Returns 0, or QCOW2_E_NOMEM. */
int check_inc(check_state *st, uint64_t offset, uint64_t size);
/* A fresh state for img: file size measured, counts and the refcount
 * block buffer allocated. Release st afterwards, even on failure. */
int check_state_init(check_state *st, qcow2_image *img, int repair,
                     qcow2_check_result *res);
void check_state_release(check_state *st);
/* Move the findings of `from` to the end of `to` (as many as the cap
 * allows; the rest are counted as dropped). */
void check_append_findings(qcow2_check_result *to, qcow2_check_result *from);
/* Keep only the findings of kind "repaired" (a pass whose problems were
 * already reported). */
void check_keep_repairs(qcow2_check_result *res);

/* ---- check_read.c: the file as check reads it ---------------------------- */
/* Up to len bytes of the image file at offset, zeroes past its end (the
 * block layer pads short reads so). I/O failure: check_errors++, a
 * finding naming `what`, and a negative status. */
int check_pread(check_state *st, uint64_t offset, void *buf, size_t len,
                const char *what);
/* check_disk_refcount when the block is not kept (or QEMU's refcount
 * reads have failed for good): checked, read, kept. Quiet: a failure
 * reports nothing and leaves no trace (no read error counted, the
 * refcounts not marked dead): the caller gives up and leaves it to a
 * loud read in QEMU's order. */
int check_disk_refcount_load(check_state *st, uint64_t cluster,
                             uint64_t *refcount, int quiet);
/* The block of `cluster` when it is kept, else NULL. A slot holds only
 * blocks whose offset was found valid. */
static inline const uint8_t *check_refblock_kept(const check_state *st,
                                                 uint64_t cluster)
{
    uint64_t index = cluster >> st->refblock_shift;
    uint32_t slot = (uint32_t)(index & (st->refblock_slots - 1));

    if (st->refcounts_dead || st->refblock_tags[slot] != index)
        return NULL;
    return st->refblocks + (size_t)slot * st->img->cluster_size;
}
static inline uint64_t check_refblock_entry(const check_state *st,
                                            const uint8_t *block,
                                            uint64_t cluster)
{
    uint64_t entry = cluster & (st->img->refblock_entries - 1);

    return st->refblock_order == 4
               ? be16(block + entry * 2)    /* the default width */
               : st->img->refcount_codec->get(block, entry);
}
/* The refcount of host cluster `cluster` as the file says (QEMU's
 * qcow2_get_refcount). 0 or a negative status (no finding made). Inline
 * for the block kept: it is called once per cluster, twice per data
 * cluster. */
static inline int check_disk_refcount(check_state *st, uint64_t cluster,
                                      uint64_t *refcount)
{
    const uint8_t *block = check_refblock_kept(st, cluster);

    if (!block)
        return check_disk_refcount_load(st, cluster, refcount, 0);
    *refcount = check_refblock_entry(st, block, cluster);
    return 0;
}
/* check_disk_refcount, quiet (see check_disk_refcount_load). */
static inline int check_disk_refcount_quiet(check_state *st,
                                            uint64_t cluster,
                                            uint64_t *refcount)
{
    const uint8_t *block = check_refblock_kept(st, cluster);

    if (!block)
        return check_disk_refcount_load(st, cluster, refcount, 1);
    *refcount = check_refblock_entry(st, block, cluster);
    return 0;
}
/* The refcount blocks kept are stale: a refcount was written. */
void check_refblocks_forget(check_state *st);
/* L2 tables of l1 (l1_size entries, host order) for check_tables_get;
 * QCOW2_E_NOMEM (no finding, no count). Close it afterwards, even on
 * failure. */
int check_tables_open(check_tables *ct, check_state *st, const uint64_t *l1,
                      uint32_t l1_size, int any_bits);
/* *table: the L2 table of L1 entry i (one the walk follows), the indexes
 * ascending. An I/O error is reported as check_pread reports it
 * (QCOW2_E_IO). */
int check_tables_get(check_tables *ct, uint32_t i, uint8_t **table);
void check_tables_close(check_tables *ct);

/* ---- check_copied.c: the COPIED flags of the active tables --------------- */
/* Active L1 entry i (its L2 offset not 0): 1 when the entries of its
 * table are to be checked, 0 when its refcount cannot be read (the table
 * skipped; in the walk, the check given up). */
int check_copied_l1(check_state *st, uint32_t i, uint64_t l1_entry);
/* Entry j (not 0) of the active table at l2_offset. */
void check_copied_l2(check_state *st, uint64_t l2_offset, uint64_t j,
                     uint64_t l2_entry);
/* After compare_refcounts: the findings the walk set aside appended, or
 * (not asked of the walk, given up) the active tables read again. An I/O
 * error is counted and ends it (0); QCOW2_E_NOMEM. */
int check_copied(check_state *st);

/* ---- check_walk.c --------------------------------------------------------- */
/* Everything QEMU's calculate_refcounts counts, in its order; the findings
 * of the snapshot table's own check first. */
int check_walk(check_state *st);
/* Findings stricter than qemu-img (counted nowhere): refcounts above 0
 * past the compared range. */
int check_strict_tail(check_state *st);

/* check_state_init + check_walk: the references of every structure
 * counted into st->counts (findings go to scratch). Release st
 * afterwards, even on failure. */
int check_count_references(qcow2_image *img, check_state *st,
                           qcow2_check_result *scratch);

/* ---- repair.c (qemu-img check -r all) ------------------------------------ */
/* Clear L1/L2 entries that cannot be followed (reserved bits, unaligned,
 * past the end of the file), in the active and the snapshot tables.
 * *blocked counts the writes not attempted because they would overlap
 * other metadata (worth a second try once the refcounts are rebuilt). */
int repair_bad_entries(qcow2_image *img, qcow2_check_result *res,
                       uint64_t *blocked);
/* 1 when the refcount structure cannot be trusted as it is (QEMU's
 * "rebuild" flag: a refcount block that is unusable or shared, a
 * referenced cluster at refcount 0), 0 when raising refcounts is enough.
 * st holds the counted references. A refcount block outside the image
 * counts only with fix_errors (-r all). */
int repair_needs_rebuild(check_state *st, int fix_errors);
/* Raise refcounts that are too low, or rebuild the whole refcount
 * structure when it cannot be trusted. */
int repair_refcounts(qcow2_image *img, qcow2_check_result *res);
/* Set the COPIED flags of the active tables from the refcounts on disk;
 * each entry changed counts in res->corruptions_fixed. */
int repair_copied(qcow2_image *img, qcow2_check_result *res);

/* Write the snapshot table again with every entry complete (QEMU's
 * qcow2_check_fix_snapshot_table), at fresh clusters; the old table is
 * freed where the refcounts, counted with the file counted_file_size
 * bytes long, include it. */
int repair_snapshot_table(qcow2_image *img, qcow2_check_result *res,
                          uint64_t counted_file_size);

static inline unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

#endif /* QCOW2_CHECK_H */
