/* Layer 9 (open/close): what operations that open files of a chain use
 * from image.c (rebase's new backing, commit's backing reopened). */
#ifndef QCOW2_OPEN_H
#define QCOW2_OPEN_H

#include "chain_ops.h"

/* See image.c. Failures are reported on img ("backing file 'name': ..."). */
int qcow2_open_chain_file(qcow2_image *img, const char *name,
                          const char *path, const char *format,
                          int read_write, qcow2_image **out);

#endif
