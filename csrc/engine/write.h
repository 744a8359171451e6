/*
 * Every engine header at once: a compatibility umbrella for files written
 * before the engine had one header per layer (csrc/README.md). New engine
 * files include the headers of their own layer and below instead.
 */
#ifndef QCOW2_WRITE_H
#define QCOW2_WRITE_H

#include "internal.h"
#include "io_fault.h"
#include "lock.h"
#include "meta_io.h"
#include "overlap.h"
#include "format.h"
#include "refcount_codec.h"
#include "snapshot_table.h"
#include "table_cache.h"
#include "cache.h"
#include "cluster.h"
#include "read_path.h"
#include "alloc.h"
#include "l1_write.h"
#include "write_path.h"
#include "ops.h"
#include "check.h"

#endif /* QCOW2_WRITE_H */
