/*
 * Operations (layer 8) on an image and the files of its chain, given
 * open: rebase's copy-in (rebase.c), commit's copy-out (commit.c) and
 * the backing-name switch (amend.c). chain.c (layer 9) opens the files.
 */
#ifndef QCOW2_CHAIN_OPS_H
#define QCOW2_CHAIN_OPS_H

#include "ops.h"

/* Every sector img does not allocate itself whose bytes through img's
 * current chain differ from new_backing's (NULL: zeroes) written into
 * img with the current chain's bytes; then img flushed. */
int qcow2_rebase_copy(qcow2_image *img, qcow2_image *new_backing);

/* The clusters img allocates itself written into base (base grown to
 * img's size first when smaller), zero clusters as zero writes; then
 * base flushed. */
int qcow2_commit_copy(qcow2_image *img, qcow2_image *base);

/* amend.c: backing name and format switched by one synced header write
 * (NULL keeps, "" removes, as qcow2_amend_opts). */
int qcow2_set_backing(qcow2_image *img, const char *backing_file,
                      const char *backing_format);

#endif
