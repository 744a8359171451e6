/* Fault-injection wrapper around an I/O backend (the Lua `io` option). */
#ifndef QCOW2_IO_FAULT_H
#define QCOW2_IO_FAULT_H

#include "internal.h"

/* What a power cut does to the writes issued since the last completed
 * flush (a disk's volatile cache). */
enum {
    QCOW2_VOLATILE_OFF = 0,     /* all kept: the cache is write-through */
    QCOW2_VOLATILE_SEEDED = 1,  /* each lost or kept by a seeded coin */
    QCOW2_VOLATILE_ALL = 2      /* all lost */
};

typedef struct qcow2_fault_plan {
    int64_t fail_after_writes;  /* -1: never; N: the N+1th write fails */
    int fail_status;            /* QCOW2_E_IO or QCOW2_E_NOSPC */
    int64_t stop_after_writes;  /* -1: never; N: writes after the Nth vanish */
    int volatile_cache;         /* QCOW2_VOLATILE_*; needs stop_after_writes */
    uint64_t seed;              /* of QCOW2_VOLATILE_SEEDED's coin */
    int trace;                  /* record every write, truncate and flush */
} qcow2_fault_plan;

typedef struct qcow2_io_trace_entry {
    uint64_t offset;            /* a truncate: the new size */
    uint64_t length;            /* 0 for a truncate or a flush */
    const char *what;           /* static string: "header", "l2", "data"...,
                                   "truncate", "flush" */
} qcow2_io_trace_entry;

void qcow2_fault_plan_init(qcow2_fault_plan *plan);
/* Wrap inner (ownership passes to the wrapper). */
int qcow2_io_wrap_faults(qcow2_io *inner, const qcow2_fault_plan *plan,
                         qcow2_io **out);
/* Wrap inner as another file of power's machine (power: a fault wrapper):
 * the same plan, one write count and one trace, so a cut stops both files
 * at the same write. Close it before power. */
int qcow2_io_wrap_faults_linked(qcow2_io *inner, qcow2_io *power,
                                qcow2_io **out);
int qcow2_io_is_fault(const qcow2_io *io);
/* Name the structure the following writes target, for the trace. */
void qcow2_io_set_label(qcow2_io *io, const char *what);
size_t qcow2_io_trace_count(const qcow2_io *io);
const qcow2_io_trace_entry *qcow2_io_trace_at(const qcow2_io *io,
                                              size_t index);

#endif
