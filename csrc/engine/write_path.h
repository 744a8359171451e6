/*
 * Guest writes and the L2 work every table change goes through (layer 7,
 * write.c; zero.c and compressed_write.c build on it). L1 growth and
 * preallocation: l1_write.h.
 */
#ifndef QCOW2_WRITE_PATH_H
#define QCOW2_WRITE_PATH_H

#include "l1_write.h"

/* ---- write.c ------------------------------------------------------------- */
/* Set the entry of one guest cluster in its L2 table (allocating the L2
 * table and its L1 entry when missing, COWing a shared L2 table). */
int qcow2_set_l2_entry(qcow2_image *img, uint64_t guest_offset,
                       uint64_t entry, uint64_t bitmap);

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
    /* Entries set, and of those the ones that need no barrier before
     * them under lazy refcounts (new clusters past the end of the file
     * for a range that read zeroes: landing before their data, they still
     * read zeroes). */
    size_t n_set, n_unordered;
    qcow2_write_state *ws;      /* whose spare buffers table and released
                                   are (NULL: they were allocated) */
} qcow2_l2_work;
int qcow2_l2_work_begin(qcow2_image *img, uint32_t l1_index,
                        qcow2_l2_work *work);
/* The same, for a caller that gets and sets only entries [first,
 * first+count): of a table changed in place only those are copied. */
int qcow2_l2_work_begin_range(qcow2_image *img, uint32_t l1_index,
                              uint64_t first, uint64_t count,
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

/* write.c: active L1 entries [first, first+count) written as one write
 * (synced) and mirrored in memory; a failure poisons the handle, the
 * metadata update being half done. count is at most 512. */
int qcow2_l1_entries_write(qcow2_image *img, uint32_t first,
                           const uint64_t *entries, uint32_t count);
/* The same for one entry. */
int qcow2_l1_entry_write(qcow2_image *img, uint32_t l1_index,
                         uint64_t entry);

#endif /* QCOW2_WRITE_PATH_H */
