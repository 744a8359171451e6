/*
 * Metadata I/O (layer 2): the reads every format codec, cache and walk
 * goes through. Only the I/O backends and errors lie below.
 */
#ifndef QCOW2_META_IO_H
#define QCOW2_META_IO_H

#include <stdint.h>
#include <stddef.h>

#include "../qcow2.h"

typedef struct qcow2_io qcow2_io;   /* internal.h */

/* Up to len bytes at offset of io into buf, the part past the end of the
 * file zero-filled (QEMU's block layer reads it so). *done gets the bytes
 * that came from the file, also on failure (read before it). Returns 0 or
 * the backend's negative status (io->last_errno set); no message. */
int qcow2_pread_zero_fill(qcow2_io *io, uint64_t offset, void *buf,
                          size_t len, size_t *done);

/* Exactly len bytes at offset of the image file. A short file is
 * QCOW2_E_CORRUPT naming `what` ("L2 table", ...); I/O error QCOW2_E_IO.
 * An open for repair reads past the end of the file as zeroes. */
int qcow2_read_meta(qcow2_image *img, uint64_t offset, void *buf,
                    size_t len, const char *what);
/* As qcow2_read_meta, and a read-only open too reads past the end of the
 * file as zeroes, as QEMU does: for the refcount and snapshot tables,
 * which such an open takes wherever they lie (header.c, damage.c). */
int qcow2_read_meta_lenient(qcow2_image *img, uint64_t offset, void *buf,
                            size_t len, const char *what);
/* len bytes of guest data at host offset of img->data_io; bytes past the
 * end of the file read as zeroes (QEMU does not pad the last cluster). */
int qcow2_read_host_data(qcow2_image *img, uint64_t offset, void *buf,
                         size_t len);
/* Read `count` L1 entries at `offset` into a new host-order array. */
int qcow2_l1_load(qcow2_image *img, uint64_t offset, uint32_t count,
                  const char *what, uint64_t **out);

#endif /* QCOW2_META_IO_H */
