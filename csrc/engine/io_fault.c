/*
 * Fault-injection backend: wraps any backend to fail the N+1th write with
 * EIO/ENOSPC, to cut the power after the Nth write (every later write,
 * truncate and flush vanishes while the engine believes they happened),
 * and to record a trace of every write, truncate and flush with the
 * structure it targeted. Crash-consistency sweeps in the specs are built
 * on it.
 *
 * A volatile cache (plan.volatile_cache): at the cut, each write issued
 * since the last completed flush may be lost as well, as from a disk's
 * write cache; that is what makes the engine's flush barriers matter.
 * Writes still go through to the inner file before the cut (reads see
 * them, as from the cache); each keeps an undo record (the bytes and file
 * size it replaced, and its own bytes). At the cut (the first dropped
 * call, or a flush or close once the N writes are done) the records are
 * undone in reverse order, back to the last flushed state, and those the
 * seeded coin keeps are redone in order. A completed flush drops them.
 * Memory: about twice the bytes written since the last flush (plus the
 * cut-off tail of a shrinking truncate), and nothing without the option.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "io_fault.h"

/* One write or truncate since the last completed flush: enough to undo
 * it and to redo it. */
typedef struct undo_rec {
    uint64_t offset;            /* of the write; a truncate: the new size */
    uint64_t old_size;          /* file size before it */
    uint8_t *old;               /* the bytes it replaced, at offset */
    size_t old_len;
    uint8_t *data;              /* the write's bytes; NULL: a truncate */
    size_t len;
    int lost;                   /* the cut's verdict, drawn when issued */
} undo_rec;

typedef struct fault_io {
    qcow2_io base;              /* first: the engine sees a qcow2_io */
    qcow2_io *inner;
    qcow2_fault_plan plan;
    uint64_t writes;            /* write and truncate calls seen so far */
    int cut_done;               /* the volatile cache was dealt with */
    uint64_t rng;               /* splitmix64 state, from plan.seed */
    const char *label;          /* what the next writes target */
    qcow2_io_trace_entry *trace;
    size_t trace_len, trace_cap;
    undo_rec *undo;             /* since the last completed flush */
    size_t undo_len, undo_cap;
    /* Another file of the same machine (commit's backing file): its
     * plan, write count and trace are `power`'s, so one cut stops every
     * file at once. NULL: this wrapper is its own power. Closed first. */
    struct fault_io *power;
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
    if (n >= 0) {
        io->reads++;
        io->bytes_read += (uint64_t)n;
    }
    return n;
}

static int record(fault_io *f, uint64_t offset, uint64_t len,
                  const char *what)
{
    if (f->power)
        f = f->power;
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
    f->trace[f->trace_len].what = what;
    f->trace_len++;
    return 0;
}

/* ---- The volatile cache ------------------------------------------------ */

/* splitmix64: a small PRNG whose whole state lives in the handle. */
static uint64_t next_random(fault_io *f)
{
    uint64_t z = (f->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static void drop_undo(fault_io *f)
{
    for (size_t i = 0; i < f->undo_len; i++) {
        free(f->undo[i].old);
        free(f->undo[i].data);
    }
    f->undo_len = 0;
}

/* Remember what a write of len bytes at offset (data non-NULL), or a
 * truncate to offset (data NULL), is about to replace. */
static int save_undo(fault_io *f, uint64_t offset, const void *data,
                     size_t len)
{
    undo_rec *r;
    uint64_t size, end;
    int rc;

    if (f->undo_len == f->undo_cap) {
        size_t cap = f->undo_cap ? f->undo_cap * 2 : 64;
        undo_rec *grown = realloc(f->undo, cap * sizeof *grown);
        if (!grown)
            return QCOW2_E_NOMEM;
        f->undo = grown;
        f->undo_cap = cap;
    }
    rc = f->inner->ops->size(f->inner, &size);
    if (rc < 0)
        return rc;
    r = &f->undo[f->undo_len];
    memset(r, 0, sizeof *r);
    r->offset = offset;
    r->old_size = size;
    /* The replaced bytes lie inside the old size: [offset, end). */
    end = data ? (len > UINT64_MAX - offset ? UINT64_MAX : offset + len) : size;
    if (end > size)
        end = size;
    if (offset < end) {
        if (end - offset > SIZE_MAX)
            return QCOW2_E_NOMEM;
        r->old_len = (size_t)(end - offset);
        r->old = malloc(r->old_len);
        if (!r->old)
            return QCOW2_E_NOMEM;
        int64_t n = f->inner->ops->pread(f->inner, r->old, r->old_len, offset);
        if (n < 0 || (uint64_t)n != r->old_len) {
            free(r->old);
            return n < 0 ? (int)n : QCOW2_E_IO;
        }
    }
    if (data) {
        r->data = malloc(len ? len : 1);
        if (!r->data) {
            free(r->old);
            return QCOW2_E_NOMEM;
        }
        memcpy(r->data, data, len);
        r->len = len;
    }
    r->lost = f->plan.volatile_cache == QCOW2_VOLATILE_ALL ||
              (next_random(f) >> 63) != 0;
    f->undo_len++;
    return 0;
}

/* The power cut: the unflushed writes are undone, newest first, back to
 * the last flushed state; those the coin keeps are redone in order. */
static int apply_cut(fault_io *f)
{
    qcow2_io *in = f->inner;
    int rc = 0, step;

    if (f->cut_done)
        return 0;
    f->cut_done = 1;
    for (size_t i = f->undo_len; i-- > 0;) {
        const undo_rec *r = &f->undo[i];
        step = in->ops->truncate(in, r->old_size);
        if (step == 0 && r->old_len)
            step = in->ops->pwrite(in, r->old, r->old_len, r->offset);
        if (rc == 0)
            rc = step;
    }
    for (size_t i = 0; i < f->undo_len; i++) {
        const undo_rec *r = &f->undo[i];
        if (r->lost)
            continue;
        step = r->data ? in->ops->pwrite(in, r->data, r->len, r->offset)
                       : in->ops->truncate(in, r->offset);
        if (rc == 0)
            rc = step;
    }
    drop_undo(f);
    return rc;
}

/* The N writes of stop_after_writes are done: power is off from here. */
static int past_cut(const fault_io *f)
{
    const fault_io *p = f->power ? f->power : f;
    return f->plan.stop_after_writes >= 0 &&
           p->writes >= (uint64_t)f->plan.stop_after_writes;
}

/* ---- Operations ---------------------------------------------------------- */

/* Counts a write-like call and says what the plan does with it:
 * 0 = perform, 1 = drop silently, <0 = fail with that status. */
static int plan_verdict(fault_io *f)
{
    int cut = past_cut(f);
    uint64_t index = ++(f->power ? f->power : f)->writes;

    if (f->plan.fail_after_writes >= 0 &&
        index > (uint64_t)f->plan.fail_after_writes) {
        f->base.last_errno = f->plan.fail_status == QCOW2_E_NOSPC ? ENOSPC : EIO;
        return f->plan.fail_status;
    }
    if (cut) {
        /* The first dropped call is where the cache is lost; a failure
         * to roll the file back must not pass for a clean cut. */
        int rc = apply_cut(f);
        if (rc < 0) {
            f->base.last_errno = f->inner->last_errno;
            return rc;
        }
        return 1;
    }
    return 0;
}

/* Before the cut a write goes through (remembered for the cut when the
 * cache is volatile); after it, nothing reaches the disk. */
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
    rc = record(f, offset, len, f->label ? f->label : "data");
    if (rc < 0 || verdict == 1)
        return rc;
    if (f->plan.volatile_cache && (rc = save_undo(f, offset, buf, len)) < 0)
        return rc;
    rc = f->inner->ops->pwrite(f->inner, buf, len, offset);
    io->last_errno = f->inner->last_errno;
    if (rc == 0) {
        io->writes++;
        io->bytes_written += len;
    }
    if (rc < 0 && f->plan.volatile_cache)
        f->undo[f->undo_len - 1].lost = 1;  /* never redo a failed write */
    return rc;
}

static int fault_truncate(qcow2_io *io, uint64_t size)
{
    fault_io *f = as_fault(io);
    int verdict, rc;

    verdict = plan_verdict(f);
    if (verdict < 0)
        return verdict;
    rc = record(f, size, 0, "truncate");
    if (rc < 0 || verdict == 1)
        return rc;
    if (f->plan.volatile_cache && (rc = save_undo(f, size, NULL, 0)) < 0)
        return rc;
    rc = f->inner->ops->truncate(f->inner, size);
    io->last_errno = f->inner->last_errno;
    return rc;
}

/* Before the cut a flush completes and empties the volatile cache; once
 * the N writes are done it never completes: the power is off. With a cut
 * planned this wrapper is the disk whose durability the sweep judges, so
 * the inner file is not fsynced (that would only make sweeps slow). */
static int fault_flush(qcow2_io *io)
{
    fault_io *f = as_fault(io);
    int rc = record(f, 0, 0, "flush");

    if (rc < 0)
        return rc;
    if (past_cut(f))
        return apply_cut(f);
    if (f->plan.stop_after_writes < 0) {
        rc = f->inner->ops->flush(f->inner);
        io->last_errno = f->inner->last_errno;
        if (rc < 0)
            return rc;
    }
    drop_undo(f);
    return 0;
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

/* A close after the cut point is the cut too; a close before it keeps
 * everything (the power stayed on, the OS writes its cache back). */
static void fault_close(qcow2_io *io)
{
    fault_io *f = as_fault(io);
    if (past_cut(f))
        (void)apply_cut(f);
    drop_undo(f);
    qcow2_io_close(f->inner);
    free(f->undo);
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
    f->rng = plan->seed;
    *out = &f->base;
    return 0;
}

int qcow2_io_wrap_faults_linked(qcow2_io *inner, qcow2_io *power,
                                qcow2_io **out)
{
    fault_io *p = as_fault(power);
    int rc = qcow2_io_wrap_faults(inner, &p->plan, out);

    if (rc < 0)
        return rc;
    while (p->power)
        p = p->power;
    as_fault(*out)->power = p;
    /* its own coin, drawn from the same seed */
    as_fault(*out)->rng = p->plan.seed ^ 0x5DEECE66Dull;
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
