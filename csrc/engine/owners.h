/*
 * img:owners(), shared between owners_walk.c (the read-only walk that
 * lists every claim a structure makes on the file) and owners.c (claims
 * sorted and swept into ranges that cover the file once).
 *
 * Memory is bounded by the file: a claim is a run of host bytes, runs of
 * one L2 table that continue each other are one claim, every L2 table is
 * walked once (the views that reach it are listed on it), and the total
 * of claims and view links is capped by a budget sized by the file.
 */
#ifndef QCOW2_OWNERS_H
#define QCOW2_OWNERS_H

#include "read_path.h"

/* At most this many problems are kept (the rest are counted). */
#define OWN_MAX_PROBLEMS        10000u

typedef struct own_claim {
    uint64_t offset;
    uint64_t length;
    uint64_t guest;             /* data, compressed, l2: guest offset */
    uint32_t ref;               /* data, compressed, l2: the L2 table
                                   (index into sources); snapshot_l1:
                                   snapshot index; refcount_block: its
                                   refcount table index */
    uint8_t kind;               /* enum qcow2_owner_kind */
    uint8_t shadow;             /* data: no view reads it */
} own_claim;

/* One L2 table, walked once, and the views (0 = active, i + 1 = snapshot
 * i) whose L1 reaches it. */
typedef struct own_source {
    uint64_t l2_offset;
    uint64_t l1_index;
    uint32_t *views;
    uint32_t n_views, cap_views;
} own_source;

typedef struct own_problem {
    uint64_t at;                /* host offset of the entry at fault */
    char *text;
} own_problem;

typedef struct own_walk {
    qcow2_image *img;
    uint64_t file_size;

    own_claim *claims;
    size_t n_claims, cap_claims;
    own_source *sources;
    size_t n_sources, cap_sources;
    /* l2_offset -> source + 1 (0 empty), open addressing */
    uint64_t *hash_keys;
    uint32_t *hash_values;
    size_t hash_cap;

    own_problem *problems;
    size_t n_problems, cap_problems;
    uint64_t problems_dropped;

    uint64_t budget;            /* claims + view links still allowed */
    int out_of_budget;

    /* The refcount table as the file holds it (NULL when it cannot be
     * read); refcount lookups of owners.c use it. */
    uint64_t *reftable;
    uint64_t reftable_entries;
} own_walk;

/* Fill w (img and file_size set, the rest zero) with every claim. Only
 * QCOW2_E_NOMEM and I/O errors fail; damage becomes problems. */
int owners_walk(own_walk *w);
void owners_walk_free(own_walk *w);
/* Record a problem (capped). */
void owners_problem(own_walk *w, uint64_t at, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The view's name: "active" or the snapshot's. */
const char *owners_view_name(const qcow2_image *img, uint32_t view);

#endif /* QCOW2_OWNERS_H */
