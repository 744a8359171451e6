/*
 * Fault-injection backend: wraps any backend to fail the N+1th write with
 * EIO/ENOSPC, to drop every write after the Nth (a power cut: the machine
 * "loses" them while the engine believes they happened), and to record a
 * trace of every write with the structure it targeted. Crash-consistency
 * sweeps in the specs are built on it.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io_fault.h"

typedef struct fault_io {
    qcow2_io base;              /* first: the engine sees a qcow2_io */
    qcow2_io *inner;
    qcow2_fault_plan plan;
    uint64_t writes;            /* write calls seen so far */
    const char *label;          /* what the next writes target */
    qcow2_io_trace_entry *trace;
    size_t trace_len, trace_cap;
} fault_io;

static fault_io *as_fault(qcow2_io *io)
{
    return (fault_io *)io;
}

static int64_t fault_pread(qcow2_io *io, void *buf, size_t len,
                           uint64_t offset)
{
    fault_io *f = as_fault(io);
    int64_t n = f->inner->ops->pread(f->inner, buf, len, offset);
    io->last_errno = f->inner->last_errno;
    return n;
}

static int record_write(fault_io *f, uint64_t offset, size_t len)
{
    if (!f->plan.trace)
        return 0;
    if (f->trace_len == f->trace_cap) {
        size_t cap = f->trace_cap ? f->trace_cap * 2 : 64;
        qcow2_io_trace_entry *grown = realloc(f->trace, cap * sizeof *grown);
        if (!grown)
            return QCOW2_E_NOMEM;
        f->trace = grown;
        f->trace_cap = cap;
    }
    f->trace[f->trace_len].offset = offset;
    f->trace[f->trace_len].length = len;
    f->trace[f->trace_len].what = f->label ? f->label : "data";
    f->trace_len++;
    return 0;
}

/* Counts a write-like call and says what the plan does with it:
 * 0 = perform, 1 = drop silently, <0 = fail with that status. */
static int plan_verdict(fault_io *f)
{
    uint64_t index = ++f->writes;
    if (f->plan.fail_after_writes >= 0 &&
        index > (uint64_t)f->plan.fail_after_writes) {
        f->base.last_errno = f->plan.fail_status == QCOW2_E_NOSPC ? ENOSPC : EIO;
        return f->plan.fail_status;
    }
    if (f->plan.stop_after_writes >= 0 &&
        index > (uint64_t)f->plan.stop_after_writes)
        return 1;
    return 0;
}

static int fault_pwrite(qcow2_io *io, const void *buf, size_t len,
                        uint64_t offset)
{
    fault_io *f = as_fault(io);
    int verdict, rc;

    if (f->inner->read_only)
        return QCOW2_E_READONLY;
    verdict = plan_verdict(f);
    if (verdict < 0)
        return verdict;
    rc = record_write(f, offset, len);
    if (rc < 0)
        return rc;
    if (verdict == 1)
        return 0;
    rc = f->inner->ops->pwrite(f->inner, buf, len, offset);
    io->last_errno = f->inner->last_errno;
    return rc;
}

/* After a power cut nothing reaches the disk, flushes included; before it a
 * flush is a real flush so that ordering is what the sweep exercises. */
static int fault_flush(qcow2_io *io)
{
    fault_io *f = as_fault(io);
    if (f->plan.stop_after_writes >= 0 &&
        f->writes >= (uint64_t)f->plan.stop_after_writes)
        return 0;
    return f->inner->ops->flush(f->inner);
}

static int fault_truncate(qcow2_io *io, uint64_t size)
{
    fault_io *f = as_fault(io);
    int verdict = plan_verdict(f);
    if (verdict < 0)
        return verdict;
    if (verdict == 1)
        return 0;
    return f->inner->ops->truncate(f->inner, size);
}

static int fault_size(qcow2_io *io, uint64_t *out)
{
    fault_io *f = as_fault(io);
    return f->inner->ops->size(f->inner, out);
}

static int fault_allocated(qcow2_io *io, uint64_t *out)
{
    fault_io *f = as_fault(io);
    return f->inner->ops->allocated(f->inner, out);
}

static void fault_close(qcow2_io *io)
{
    fault_io *f = as_fault(io);
    qcow2_io_close(f->inner);
    free(f->trace);
    free(f);
}

static const qcow2_io_ops fault_ops = {
    .pread = fault_pread,
    .pwrite = fault_pwrite,
    .flush = fault_flush,
    .truncate = fault_truncate,
    .size = fault_size,
    .allocated = fault_allocated,
    .close = fault_close,
};

void qcow2_fault_plan_init(qcow2_fault_plan *plan)
{
    memset(plan, 0, sizeof *plan);
    plan->fail_after_writes = -1;
    plan->stop_after_writes = -1;
    plan->fail_status = QCOW2_E_IO;
}

int qcow2_io_wrap_faults(qcow2_io *inner, const qcow2_fault_plan *plan,
                         qcow2_io **out)
{
    fault_io *f = calloc(1, sizeof *f);
    if (!f)
        return QCOW2_E_NOMEM;
    f->base.ops = &fault_ops;
    f->base.read_only = inner->read_only;
    f->base.dev = inner->dev;
    f->base.ino = inner->ino;
    f->inner = inner;
    f->plan = *plan;
    *out = &f->base;
    return 0;
}

int qcow2_io_is_fault(const qcow2_io *io)
{
    return io->ops == &fault_ops;
}

void qcow2_io_set_label(qcow2_io *io, const char *what)
{
    if (io && qcow2_io_is_fault(io))
        as_fault(io)->label = what;
}

size_t qcow2_io_trace_count(const qcow2_io *io)
{
    return io && qcow2_io_is_fault(io) ? ((const fault_io *)io)->trace_len : 0;
}

const qcow2_io_trace_entry *qcow2_io_trace_at(const qcow2_io *io,
                                              size_t index)
{
    if (!io || !qcow2_io_is_fault(io))
        return NULL;
    const fault_io *f = (const fault_io *)io;
    return index < f->trace_len ? &f->trace[index] : NULL;
}
