/*
 * QEMU-compatible image locks (see lock.h): which bytes a request locks,
 * which it tests, and the one-line refusal naming the other holder's role.
 * Only fcntl lock calls on an fd: taking or testing a lock writes nothing.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"
#include "lock.h"

/* QEMU's RAW_LOCK_PERM_BASE / RAW_LOCK_SHARED_BASE: libvirt owns byte 0. */
#define LOCK_PERM_BASE      100
#define LOCK_SHARED_BASE    200
#define LOCK_PERM_COUNT     4   /* bits of LOCK_PERM_ALL */

void qcow2_lock_req_for(int role, qcow2_lock_req *req)
{
    const uint32_t C = LOCK_PERM_CONSISTENT_READ, W = LOCK_PERM_WRITE,
                   WU = LOCK_PERM_WRITE_UNCHANGED, R = LOCK_PERM_RESIZE,
                   ALL = LOCK_PERM_ALL;

    switch (role) {
    case LOCK_QCOW2_RW:     *req = (qcow2_lock_req){ C | W | R, C | WU };   break;
    case LOCK_QCOW2_RO:     *req = (qcow2_lock_req){ C, ALL & ~(W | R) };   break;
    case LOCK_DATA_FILE_RW: *req = (qcow2_lock_req){ C | W | R, ALL & ~R }; break;
    case LOCK_DATA_FILE_RO: *req = (qcow2_lock_req){ C, ALL & ~R };         break;
    case LOCK_RAW_RW:       *req = (qcow2_lock_req){ C | W, ALL };          break;
    case LOCK_SHARED:       *req = (qcow2_lock_req){ C, ALL };              break;
    case LOCK_CREATE:       *req = (qcow2_lock_req){ W | R, ALL & ~R };     break;
    default:                *req = (qcow2_lock_req){ 0, ALL };              break;
    }
}

/* Read-lock (F_RDLCK) or unlock one byte range of this open file. */
static int set_lock(int fd, short type, off_t start, off_t len)
{
    struct flock fl;

    memset(&fl, 0, sizeof fl);      /* OFD locks require l_pid == 0 */
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = len;
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? errno : 0;
}

/* Would a write lock on byte `at` conflict with another open's lock?
 * 1 yes, 0 no, -errno when the probe fails. Our own locks never count. */
static int byte_taken(int fd, int at)
{
    struct flock fl;

    memset(&fl, 0, sizeof fl);
    fl.l_type = F_WRLCK;
    fl.l_whence = SEEK_SET;
    fl.l_start = at;
    fl.l_len = 1;
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
        return -errno;
    return fl.l_type != F_UNLCK;
}

static int take_bytes(int fd, uint32_t bits, int base)
{
    for (int i = 0; i < LOCK_PERM_COUNT; i++) {
        if (bits & (1u << i)) {
            int e = set_lock(fd, F_RDLCK, base + i, 1);
            if (e)
                return e;
        }
    }
    return 0;
}

/* First byte of `bits` at `base` another open holds: 1 with *bit set,
 * 0 when none, -errno on a failed probe. */
static int find_taken(int fd, uint32_t bits, int base, uint32_t *bit)
{
    for (int i = 0; i < LOCK_PERM_COUNT; i++) {
        if (bits & (1u << i)) {
            int taken = byte_taken(fd, base + i);
            if (taken != 0) {
                *bit = 1u << i;
                return taken;
            }
        }
    }
    return 0;
}

/* Take the locks, then look for conflicts: QEMU's raw_apply_lock_bytes
 * followed by raw_check_lock_bytes, in that order, so that of two opens
 * racing at least one sees the other. */
static int lock_and_check(int fd, const qcow2_lock_req *req,
                          qcow2_lock_conflict *conflict)
{
    uint32_t not_shared = LOCK_PERM_ALL & ~req->shared;
    uint32_t bit = 0;
    int e, found;

    e = take_bytes(fd, req->perm, LOCK_PERM_BASE);
    if (e == 0)
        e = take_bytes(fd, not_shared, LOCK_SHARED_BASE);
    if (e)
        return -e;
    found = find_taken(fd, req->perm, LOCK_SHARED_BASE, &bit);
    if (found == 1)
        conflict->unshared = 1;
    else if (found == 0)
        found = find_taken(fd, not_shared, LOCK_PERM_BASE, &bit);
    if (found <= 0)
        return found;
    conflict->perm = bit;
    /* The role for the message: does the other side write? */
    found = byte_taken(fd, LOCK_PERM_BASE + 1);         /* WRITE */
    if (found == 0)
        found = byte_taken(fd, LOCK_PERM_BASE + 3);     /* RESIZE */
    conflict->other_writes = found == 1;
    return 1;
}

int qcow2_lock_fd(int fd, const qcow2_lock_req *req,
                  qcow2_lock_conflict *conflict)
{
    int ret;

    memset(conflict, 0, sizeof *conflict);
    if (req->perm == 0 && req->shared == LOCK_PERM_ALL)
        return 0;
    ret = lock_and_check(fd, req, conflict);
    if (ret == 0)
        return 0;
    /* Drop whatever was taken: a refused open leaves no trace. */
    (void)set_lock(fd, F_UNLCK, LOCK_PERM_BASE,
                   LOCK_SHARED_BASE + LOCK_PERM_COUNT - LOCK_PERM_BASE);
    if (ret == 1)
        return QCOW2_E_BUSY;
    if (ret == -EINVAL)
        return 0;       /* no OFD locks in this kernel: QEMU's auto is off */
    conflict->sys_errno = -ret;
    return QCOW2_E_IO;
}

/* QEMU's bdrv_perm_names wording. */
static const char *perm_name(uint32_t bit)
{
    switch (bit) {
    case LOCK_PERM_CONSISTENT_READ: return "consistent read";
    case LOCK_PERM_WRITE:           return "write";
    case LOCK_PERM_WRITE_UNCHANGED: return "write unchanged";
    case LOCK_PERM_RESIZE:          return "resize";
    default:                        return "unknown";
    }
}

void qcow2_lock_describe(const qcow2_lock_conflict *conflict, int read_only,
                         char *buf, size_t len)
{
    const char *name = perm_name(conflict->perm);
    const char *role;
    char text[128];

    if (conflict->sys_errno) {
        snprintf(buf, len, "cannot lock the image: %s",
                 qcow2_errno_text(conflict->sys_errno, text, sizeof text));
        return;
    }
    if (conflict->other_writes)
        role = "a writer (a QEMU process or another handle has it open "
               "read-write)";
    else if (conflict->perm & (LOCK_PERM_WRITE | LOCK_PERM_RESIZE))
        role = "a reader that does not share writes (a QEMU process or "
               "another handle has it open read-only)";
    else
        role = "another process that does not share it";
    /* QEMU's own words first, so its documentation applies. */
    snprintf(buf, len, "Failed to get %s\"%s\" lock: the image is held by "
             "%s%s", conflict->unshared ? "" : "shared ", name, role,
             read_only && conflict->other_writes
                 ? "; force_share = true opens it anyway, but its reads "
                   "may be inconsistent while the writer runs"
                 : "");
}
