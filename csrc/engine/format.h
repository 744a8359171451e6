/*
 * Format codecs (layer 3): the header and its extensions parsed and
 * written, geometry, table placement checks. The refcount-entry codec and
 * the snapshot table have headers of their own (refcount_codec.h,
 * snapshot_table.h), included here.
 */
#ifndef QCOW2_FORMAT_H
#define QCOW2_FORMAT_H

#include "overlap.h"
#include "refcount_codec.h"
#include "snapshot_table.h"

/* ---- Header (header.c) ------------------------------------------------ */
/* Parse and validate the header and extensions of img->io into img
 * (geometry fields too). Refuses what QEMU refuses, naming the field. */
int qcow2_header_load(qcow2_image *img);
void qcow2_header_free(qcow2_image *img);

/* The feature names QEMU 7.2 writes in its feature-name table, in its
 * order (header.c): names for images without a table, and the table
 * header_write.c writes. */
#define QCOW2_KNOWN_FEATURES 8
typedef struct qcow2_known_feature {
    uint8_t type;               /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    const char *name;
} qcow2_known_feature;
extern const qcow2_known_feature qcow2_known_features[QCOW2_KNOWN_FEATURES];

/* ---- Geometry (geometry.c) -------------------------------------------- */
/* log2 of the entries of one L2 table. */
uint32_t qcow2_l2_bits_for(uint32_t cluster_bits, int extended_l2);
/* Every geometry field of img (cluster, L2, subcluster and refcount-block
 * sizes) from the three header fields that fix them (already validated). */
void qcow2_geometry_set(qcow2_image *img, uint32_t cluster_bits,
                        int extended_l2, uint32_t refcount_order);
/* L1 entries that map `size` guest bytes with this geometry (no limit
 * applied: qcow2_l1_entries_needed and create apply theirs). */
uint64_t qcow2_l1_entries_for(uint32_t cluster_bits, uint32_t l2_bits,
                              uint64_t size);

/* ---- Open-path helpers (header.c, image.c; added by the open work) -----
 * qcow2_header_load expects img->io and img->file_size to be set. */
/* A metadata table of `length` bytes at `offset`: cluster aligned, inside
 * the file, clear of cluster 0 (QCOW2_E_CORRUPT naming `what`). An empty
 * table only has to be aligned. */
int qcow2_check_table(qcow2_image *img, const char *what, uint64_t offset,
                      uint64_t length);
/* QCOW2_E_CORRUPT when two tables share a byte. */
int qcow2_check_tables_apart(qcow2_image *img, const char *what_a,
                             uint64_t a, uint64_t a_length,
                             const char *what_b, uint64_t b,
                             uint64_t b_length);
/* L1 entries needed to map `size` guest bytes; QCOW2_E_CORRUPT (no
 * message) when that exceeds INT32_MAX, as QEMU refuses. */
int qcow2_l1_entries_needed(const qcow2_image *img, uint64_t size,
                            uint64_t *entries);

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

#endif /* QCOW2_FORMAT_H */
