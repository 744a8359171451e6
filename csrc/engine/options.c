/*
 * The open options' defaults (layer 1): QEMU's, where "-1" means "the
 * image decides". Create and open both start from them.
 */
#include <string.h>

#include "../qcow2.h"

void qcow2_open_opts_init(qcow2_open_opts *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->lazy_refcounts = -1;
    opts->overlap_check = -1;
    opts->fail_after_writes = -1;
    opts->fail_status = QCOW2_E_IO;
    opts->stop_after_writes = -1;
}
