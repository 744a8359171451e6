/*
 * Operations (layer 8) other engine files call: whole-state switches
 * (switch.c), the layout of a new image (create.c) and the ranges two
 * maps cannot prove equal (diff.c). check.h holds
 * check's and repair's. The rest (snapshots, amend, resize) is public,
 * in csrc/qcow2.h.
 */
#ifndef QCOW2_OPS_H
#define QCOW2_OPS_H

#include "write_path.h"

/* ---- create.c: the new image laid out and closed again (qcow2_create,
 * image.c, opens it). Errors as qcow2_create's, in err (not NULL). */
int qcow2_create_layout(const char *path, const qcow2_create_opts *opts,
                        qcow2_error *err);

/* ---- diff.c: the ranges of guest [start, start + length) that the maps
 * of a and b (each through its chain, zeroes past its size) cannot prove
 * to hold the same bytes, sector aligned and merged, to fn in order;
 * nothing is read. 0, fn's non-zero value, or a failure (on a). */
int qcow2_diff_unproven(qcow2_image *a, qcow2_image *b, uint64_t start,
                        uint64_t length, qcow2_range_fn fn, void *ctx);

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

#endif /* QCOW2_OPS_H */
