/*
 * The snapshot table codec (layer 3, snapshot_table.c): img->snapshots
 * parsed from the file, and the bytes of a table to write. The parsed
 * entry type, qcow2_snapshot, is internal.h's.
 */
#ifndef QCOW2_SNAPSHOT_TABLE_H
#define QCOW2_SNAPSHOT_TABLE_H

#include "internal.h"

/* img->snapshots from the table the header points at, QEMU's limits
 * applied (an open for repair keeps what check -r all mends). */
int qcow2_snapshots_load(qcow2_image *img);
void qcow2_snapshots_free(qcow2_image *img);

/* Bytes of the table now on disk, padding after the last entry excluded
 * (0 without snapshots). */
uint64_t qcow2_snapshot_table_size(const qcow2_image *img);

/* The snapshot's disk size: its own, or the image's when the entry does
 * not record one. */
uint64_t qcow2_snapshot_disk_size(const qcow2_image *img,
                                  const qcow2_snapshot *sn);

/* The bytes of a snapshot table holding `list`, laid out as QEMU's
 * qcow2_write_snapshots writes it (every entry complete); *table (NULL for
 * an empty list) is the caller's to free. QCOW2_E_INVALID past QEMU's
 * 64 MiB. */
int qcow2_snapshot_table_build(qcow2_image *img, qcow2_snapshot *const *list,
                               uint32_t count, uint8_t **table,
                               uint64_t *size);

#endif /* QCOW2_SNAPSHOT_TABLE_H */
