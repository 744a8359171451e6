/*
 * Guest-to-host lookups shared by cluster.c, read.c and map.c: one L2
 * entry decoded into the state of a (sub)cluster, and "runs" of guest
 * bytes that share a state and contiguous host offsets, so that callers
 * issue one pread per run instead of one per cluster.
 */
#ifndef QCOW2_CLUSTER_H
#define QCOW2_CLUSTER_H

#include "cache.h"

/* QEMU's QCOW2_SUBCLUSTER_* states. Without extended L2 a cluster is one
 * subcluster. */
enum qcow2_sc_type {
    SC_UNALLOCATED_PLAIN = 0,   /* no host cluster: backing or zeroes */
    SC_UNALLOCATED_ALLOC,       /* host cluster exists, subcluster not
                                   written: backing or zeroes (ext L2) */
    SC_ZERO_PLAIN,              /* reads as zeroes, no host cluster */
    SC_ZERO_ALLOC,              /* reads as zeroes, host cluster kept */
    SC_NORMAL,                  /* data at host_offset */
    SC_COMPRESSED,              /* one compressed cluster */
    SC_CORRUPT,                 /* metadata that cannot be followed: the
                                   reason is the handle's error message */
};

typedef struct qcow2_run {
    uint64_t guest_offset;      /* where the run starts */
    uint64_t length;            /* guest bytes, > 0 */
    int type;                   /* enum qcow2_sc_type */
    /* NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC: host byte offset (in
     * img->data_io) of guest_offset. COMPRESSED: host byte offset of the
     * stream (coffset). Otherwise 0. */
    uint64_t host_offset;
    uint64_t compressed_size;   /* COMPRESSED: csize, the sector-rounded
                                   upper bound of the stream */
    uint64_t cluster_offset;    /* COMPRESSED: guest offset of the cluster */
    /* CORRUPT: the damaged unit the run lies in (its cluster for a bad L2
     * entry, the L1 entry's whole range for an L2 table that cannot be
     * read): runs cut from one unit share it. */
    uint64_t damage_start, damage_length;
} qcow2_run;

static inline int sc_type_has_host(int type)
{
    return type == SC_NORMAL || type == SC_ZERO_ALLOC ||
           type == SC_UNALLOCATED_ALLOC;
}

static inline int sc_type_is_unallocated(int type)
{
    return type == SC_UNALLOCATED_PLAIN || type == SC_UNALLOCATED_ALLOC;
}

/*
 * The run starting at guest_offset (< img->size is not required; past the
 * L1 table everything is unallocated): at most max_len bytes (> 0), never
 * past the end of the L2 table that maps guest_offset (a range without L2
 * table runs on over the following empty L1 entries), one compressed
 * cluster at most. Every entry the run covers was validated; a bad entry
 * at guest_offset fails with QCOW2_E_CORRUPT naming the guest offset, the
 * entry and the reason (an invalid entry further on just ends the run).
 */
int qcow2_lookup_run(qcow2_image *img, uint64_t guest_offset,
                     uint64_t max_len, qcow2_run *run);

/*
 * As qcow2_lookup_run, but damage is a run rather than a failure: an
 * L1 entry that is invalid or whose L2 table cannot be read gives an
 * SC_CORRUPT run to the end of that L1 entry's range, a bad L2 entry one
 * to the end of its cluster; the one-line reason is left in the handle's
 * error message (QCOW2_E_CORRUPT). I/O errors still fail.
 */
int qcow2_lookup_span(qcow2_image *img, uint64_t guest_offset,
                      uint64_t max_len, qcow2_run *run);

/* End of the file holding guest data (img->data_io). */
int qcow2_data_file_end(qcow2_image *img, uint64_t *end);

#endif /* QCOW2_CLUSTER_H */
