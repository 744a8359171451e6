/*
 * I/O backends behind the qcow2_io vtable: a file (pread/pwrite on an fd)
 * and a growable memory buffer. Read-only backends refuse writes without
 * touching the file, so a read-only open can never change a byte. File
 * backends take QEMU's image locks on request (qcow2_io_lock).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"
#include "lock.h"

/* One pread/pwrite call moves at most this much (Linux caps near 2 GiB). */
#define IO_CHUNK_BYTES  (1u << 30)
/* Largest offset pread/pwrite take (off_t is signed). */
#define IO_MAX_OFFSET   ((uint64_t)INT64_MAX)

/* The status an errno stands for. */
static int status_from_errno(int sys_errno, int read_write)
{
    switch (sys_errno) {
    case ENOENT:
    case ENOTDIR:
        return QCOW2_E_NOTFOUND;
    case ENOSPC:
    case EDQUOT:
        return QCOW2_E_NOSPC;
    case ENOMEM:
        return QCOW2_E_NOMEM;
    case EROFS:
    case EACCES:
    case EPERM:
        /* Only a write open is refused for being read-only; a read
         * open without permission is an ordinary I/O failure. */
        return read_write ? QCOW2_E_READONLY : QCOW2_E_IO;
    default:
        return QCOW2_E_IO;
    }
}

/* ---- File backend ------------------------------------------------------- */

typedef struct file_io {
    qcow2_io base;              /* first: the engine sees a qcow2_io */
    int fd;
    int is_block_device;        /* size comes from lseek, not st_size */
} file_io;

static file_io *as_file(qcow2_io *io)
{
    return (file_io *)io;
}

static int64_t file_pread(qcow2_io *io, void *buf, size_t len,
                          uint64_t offset)
{
    file_io *f = as_file(io);
    uint8_t *dst = buf;
    size_t done = 0;

    while (done < len) {
        uint64_t at = offset + done;
        size_t chunk = (size_t)min_u64(len - done, IO_CHUNK_BYTES);
        ssize_t n;

        /* Past what off_t can address there is nothing to read. */
        if (offset > IO_MAX_OFFSET || at > IO_MAX_OFFSET - chunk)
            break;
        n = pread(f->fd, dst + done, chunk, (off_t)at);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            io->last_errno = errno;
            return status_from_errno(errno, 0);
        }
        if (n == 0)
            break;              /* end of file */
        done += (size_t)n;
    }
    io->reads++;
    io->bytes_read += done;
    return (int64_t)done;
}

static int file_pwrite(qcow2_io *io, const void *buf, size_t len,
                       uint64_t offset)
{
    file_io *f = as_file(io);
    const uint8_t *src = buf;
    size_t done = 0;

    if (io->read_only)
        return QCOW2_E_READONLY;
    if (offset > IO_MAX_OFFSET || len > IO_MAX_OFFSET - offset) {
        io->last_errno = EFBIG;
        return QCOW2_E_INVALID;
    }
    while (done < len) {
        size_t chunk = (size_t)min_u64(len - done, IO_CHUNK_BYTES);
        ssize_t n = pwrite(f->fd, src + done, chunk, (off_t)(offset + done));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            io->last_errno = errno;
            return status_from_errno(errno, 1);
        }
        if (n == 0) {
            io->last_errno = ENOSPC;
            return QCOW2_E_NOSPC;
        }
        done += (size_t)n;
    }
    io->writes++;
    io->bytes_written += len;
    return 0;
}

static int file_flush(qcow2_io *io)
{
    file_io *f = as_file(io);

    if (io->read_only)
        return 0;               /* nothing of ours to make durable */
    while (fdatasync(f->fd) < 0) {
        if (errno != EINTR) {
            io->last_errno = errno;
            return status_from_errno(errno, 1);
        }
    }
    return 0;
}

static int file_truncate(qcow2_io *io, uint64_t size)
{
    file_io *f = as_file(io);

    if (io->read_only)
        return QCOW2_E_READONLY;
    if (size > IO_MAX_OFFSET) {
        io->last_errno = EFBIG;
        return QCOW2_E_INVALID;
    }
    while (ftruncate(f->fd, (off_t)size) < 0) {
        if (errno != EINTR) {
            io->last_errno = errno;
            return status_from_errno(errno, 1);
        }
    }
    return 0;
}

static int file_stat(qcow2_io *io, struct stat *st)
{
    if (fstat(as_file(io)->fd, st) < 0) {
        io->last_errno = errno;
        return status_from_errno(errno, 0);
    }
    return 0;
}

static int file_size(qcow2_io *io, uint64_t *out)
{
    file_io *f = as_file(io);
    struct stat st;
    int ret;

    if (f->is_block_device) {
        off_t end = lseek(f->fd, 0, SEEK_END);
        if (end < 0) {
            io->last_errno = errno;
            return status_from_errno(errno, 0);
        }
        *out = (uint64_t)end;
        return 0;
    }
    ret = file_stat(io, &st);
    if (ret < 0)
        return ret;
    *out = st.st_size < 0 ? 0 : (uint64_t)st.st_size;
    return 0;
}

static int file_allocated(qcow2_io *io, uint64_t *out)
{
    struct stat st;
    int ret = file_stat(io, &st);

    if (ret < 0)
        return ret;
    *out = st.st_blocks < 0 ? 0 : (uint64_t)st.st_blocks * 512;
    return 0;
}

static void file_close(qcow2_io *io)
{
    file_io *f = as_file(io);

    if (f->fd >= 0)
        close(f->fd);           /* EINTR on close: the fd is gone anyway */
    free(f);
}

static const qcow2_io_ops file_ops = {
    .pread = file_pread,
    .pwrite = file_pwrite,
    .flush = file_flush,
    .truncate = file_truncate,
    .size = file_size,
    .allocated = file_allocated,
    .close = file_close,
};

/* A FIFO or socket would block or lie about its size; a folder has no
 * bytes. Regular files, block and character devices are images. */
static int check_file_kind(const struct stat *st)
{
    if (S_ISDIR(st->st_mode))
        return EISDIR;
    if (S_ISFIFO(st->st_mode) || S_ISSOCK(st->st_mode))
        return EINVAL;
    return 0;
}

int qcow2_io_open_file(const char *path, int read_write, qcow2_io **out,
                       int *sys_errno)
{
    /* O_NONBLOCK keeps a FIFO from hanging the open; it is dropped once
     * the file is known to be something else. */
    int flags = (read_write ? O_RDWR : O_RDONLY) | O_CLOEXEC | O_NONBLOCK;
    struct stat st;
    file_io *f;
    int fd, kind_errno;

    *out = NULL;
    if (sys_errno)
        *sys_errno = 0;
    do {
        fd = open(path, flags);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
        int e = errno;
        if (sys_errno)
            *sys_errno = e;
        return status_from_errno(e, read_write);
    }
    if (fstat(fd, &st) < 0) {
        kind_errno = errno;
    } else {
        kind_errno = check_file_kind(&st);
    }
    if (kind_errno == 0 && fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) < 0)
        kind_errno = errno;
    if (kind_errno != 0) {
        close(fd);
        if (sys_errno)
            *sys_errno = kind_errno;
        return kind_errno == EISDIR || kind_errno == EINVAL
                   ? QCOW2_E_INVALID : status_from_errno(kind_errno, 0);
    }

    f = calloc(1, sizeof *f);
    if (!f) {
        close(fd);
        if (sys_errno)
            *sys_errno = ENOMEM;
        return QCOW2_E_NOMEM;
    }
    f->base.ops = &file_ops;
    f->base.read_only = !read_write;
    f->base.dev = (uint64_t)st.st_dev;
    f->base.ino = (uint64_t)st.st_ino;
    f->fd = fd;
    f->is_block_device = S_ISBLK(st.st_mode);
    *out = &f->base;
    return 0;
}

/* QEMU's file-driver locks on the file's own open (lock.c); a memory
 * image is nobody else's to see, so it takes none. */
int qcow2_io_lock(qcow2_io *io, int role, qcow2_lock_conflict *conflict)
{
    qcow2_lock_req req;

    memset(conflict, 0, sizeof *conflict);
    if (io->ops != &file_ops || role == LOCK_NONE)
        return 0;
    qcow2_lock_req_for(role, &req);
    return qcow2_lock_fd(as_file(io)->fd, &req, conflict);
}

/* ---- Memory backend ------------------------------------------------------ */

typedef struct memory_io {
    qcow2_io base;
    uint8_t *data;
    size_t len;
    size_t cap;
} memory_io;

static memory_io *as_memory(qcow2_io *io)
{
    return (memory_io *)io;
}

static int64_t memory_pread(qcow2_io *io, void *buf, size_t len,
                            uint64_t offset)
{
    memory_io *m = as_memory(io);
    size_t n;

    if (offset >= m->len)
        return 0;
    n = (size_t)min_u64(len, m->len - offset);
    /* An int64_t count cannot say more than INT64_MAX bytes. */
    n = (size_t)min_u64(n, (uint64_t)INT64_MAX);
    memcpy(buf, m->data + offset, n);
    io->reads++;
    io->bytes_read += n;
    return (int64_t)n;
}

#define MEMORY_FILE_MAX (256ull << 20)   /* bytes */

/* Make room for `needed` bytes, new bytes zeroed. */
static int memory_reserve(memory_io *m, uint64_t needed)
{
    uint64_t cap;
    uint8_t *grown;

    if (needed <= m->cap)
        return 0;
    /* A memory file is a test tool: a hostile image must not make it
     * take the machine's memory (a real file would grow sparse). */
    if (needed > MEMORY_FILE_MAX || needed > SIZE_MAX / 2) {
        m->base.last_errno = EFBIG;
        return QCOW2_E_NOSPC;
    }
    cap = max_u64(needed, m->cap ? (uint64_t)m->cap * 2 : 4096);
    cap = cap > MEMORY_FILE_MAX ? needed : cap;
    grown = realloc(m->data, (size_t)cap);
    if (!grown) {
        m->base.last_errno = ENOMEM;
        return QCOW2_E_NOMEM;
    }
    memset(grown + m->cap, 0, (size_t)cap - m->cap);
    m->data = grown;
    m->cap = (size_t)cap;
    return 0;
}

static int memory_pwrite(qcow2_io *io, const void *buf, size_t len,
                         uint64_t offset)
{
    memory_io *m = as_memory(io);
    uint64_t end;
    int ret;

    if (io->read_only)
        return QCOW2_E_READONLY;
    if (add_overflows(offset, len, &end)) {
        io->last_errno = EFBIG;
        return QCOW2_E_INVALID;
    }
    ret = memory_reserve(m, end);
    if (ret < 0)
        return ret;
    memcpy(m->data + offset, buf, len);
    if (end > m->len)
        m->len = (size_t)end;
    io->writes++;
    io->bytes_written += len;
    return 0;
}

static int memory_flush(qcow2_io *io)
{
    (void)io;
    return 0;
}

static int memory_truncate(qcow2_io *io, uint64_t size)
{
    memory_io *m = as_memory(io);
    int ret;

    if (io->read_only)
        return QCOW2_E_READONLY;
    ret = memory_reserve(m, size);
    if (ret < 0)
        return ret;
    /* Shrinking: bytes past the end must read as zero if it grows again. */
    if (size < m->len)
        memset(m->data + size, 0, m->len - (size_t)size);
    m->len = (size_t)size;
    return 0;
}

static int memory_size(qcow2_io *io, uint64_t *out)
{
    *out = as_memory(io)->len;
    return 0;
}

static void memory_close(qcow2_io *io)
{
    memory_io *m = as_memory(io);

    free(m->data);
    free(m);
}

static const qcow2_io_ops memory_ops = {
    .pread = memory_pread,
    .pwrite = memory_pwrite,
    .flush = memory_flush,
    .truncate = memory_truncate,
    .size = memory_size,
    .allocated = memory_size,   /* every byte of the buffer is allocated */
    .close = memory_close,
};

int qcow2_io_open_memory(const void *data, size_t len, int read_write,
                         qcow2_io **out)
{
    memory_io *m = calloc(1, sizeof *m);
    int ret;

    *out = NULL;
    if (!m)
        return QCOW2_E_NOMEM;
    m->base.ops = &memory_ops;
    ret = memory_reserve(m, len);
    if (ret < 0) {
        free(m);
        return ret;
    }
    if (len)
        memcpy(m->data, data, len);
    m->len = len;
    m->base.read_only = !read_write;
    *out = &m->base;
    return 0;
}

void qcow2_io_close(qcow2_io *io)
{
    if (io)
        io->ops->close(io);
}
