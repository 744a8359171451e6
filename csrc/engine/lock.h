/*
 * Image locking as QEMU's file driver does it (QEMU 7.2 block/file-posix.c),
 * so qemu-img/qemu-io and the library see each other's handles.
 *
 * A holder of permission bit i read-locks byte 100+i; a holder that does
 * not share bit i read-locks byte 200+i. A newcomer tests, with a write
 * lock probe, byte 200+i for each bit it wants and byte 100+i for each bit
 * it does not share. Locks are open file description (OFD) locks: they
 * belong to one open() of the file, so two handles in one process see each
 * other, and closing the handle's fd releases them. Nothing is written.
 */
#ifndef QCOW2_LOCK_H
#define QCOW2_LOCK_H

#include <stddef.h>
#include <stdint.h>

typedef struct qcow2_io qcow2_io;

/* QEMU 7.2 BlockPermission bits (include/block/block-common.h). */
#define LOCK_PERM_CONSISTENT_READ   0x1u
#define LOCK_PERM_WRITE             0x2u
#define LOCK_PERM_WRITE_UNCHANGED   0x4u
#define LOCK_PERM_RESIZE            0x8u
#define LOCK_PERM_ALL               0xfu

typedef struct qcow2_lock_req {
    uint32_t perm;      /* LOCK_PERM_* this handle takes */
    uint32_t shared;    /* LOCK_PERM_* others may hold at the same time */
} qcow2_lock_req;

/* The requests QEMU 7.2 makes on the file under each kind of open
 * (seen in /proc/locks while qemu-io held such images). */
enum qcow2_lock_role {
    LOCK_NONE,          /* memory images, probes: no locks */
    LOCK_QCOW2_RW,      /* qcow2 read-write: C|W|RESIZE, shares C|WU */
    LOCK_QCOW2_RO,      /* qcow2 read-only (and backing): C, shares all but
                           W|RESIZE */
    LOCK_DATA_FILE_RW,  /* external data file of a read-write qcow2:
                           C|W|RESIZE, shares all but RESIZE */
    LOCK_DATA_FILE_RO,  /* of a read-only qcow2: C, shares all but RESIZE */
    LOCK_RAW_RW,        /* raw image read-write: C|W, shares all */
    LOCK_SHARED,        /* raw read-only, force_share (-U): C, shares all */
    LOCK_CREATE,        /* file creation: W|RESIZE, shares all but RESIZE */
};

void qcow2_lock_req_for(int role, qcow2_lock_req *req);

/* Why a lock was refused: the first byte found locked by another open. */
typedef struct qcow2_lock_conflict {
    uint32_t perm;          /* the LOCK_PERM_* bit of that byte */
    int unshared;           /* 1: byte 200+i, another holder does not share
                               perm; 0: byte 100+i, another holder has perm,
                               which this request does not share */
    int other_writes;       /* another holder has WRITE or RESIZE */
    int sys_errno;          /* fcntl failed for another reason (0: none) */
} qcow2_lock_conflict;

/*
 * Take req's locks on fd, then test for other holders, as QEMU's
 * raw_handle_perm_lock does. 0 when granted; QCOW2_E_BUSY with *conflict
 * filled when another open holds a conflicting byte; QCOW2_E_IO when fcntl
 * fails (conflict->sys_errno). On failure the locks taken are dropped.
 * A kernel without OFD locks (EINVAL) means no locking, as QEMU's
 * locking=auto.
 */
int qcow2_lock_fd(int fd, const qcow2_lock_req *req,
                  qcow2_lock_conflict *conflict);

/* Lock an I/O backend's file (io.c): memory backends take no locks. */
int qcow2_io_lock(qcow2_io *io, int role, qcow2_lock_conflict *conflict);

/* One line for a refusal: QEMU's "Failed to get ... lock" and the other
 * holder's role. `read_only` adds the force_share hint. */
void qcow2_lock_describe(const qcow2_lock_conflict *conflict, int read_only,
                         char *buf, size_t len);

#endif /* QCOW2_LOCK_H */
