/*
 * The engine's floor (layer 1): format constants, the I/O backends, errors
 * and the shared handle type every layer works on. Nothing in here is seen
 * by the binding except through csrc/qcow2.h.
 *
 * One header per layer sits on top of this one, each including the one
 * below (csrc/README.md lists them): meta_io.h and overlap.h (2),
 * format.h (3), cache.h (4), cluster.h and read_path.h (5), alloc.h (6),
 * l1_write.h and write_path.h (7), ops.h and check.h (8). A file includes
 * the headers of its own layer and below; write.h includes them all.
 */
#ifndef QCOW2_INTERNAL_H
#define QCOW2_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>

#include "../qcow2.h"
#include "util.h"

/* ---- Format constants (docs/qcow2-format.md) ---------------------------- */
#define QCOW2_MAGIC                 0x514649FBu
#define QCOW2_V2_HEADER_LENGTH      72u
#define QCOW2_V3_MIN_HEADER_LENGTH  104u
#define QCOW2_MIN_CLUSTER_BITS      9u
#define QCOW2_MAX_CLUSTER_BITS      21u
#define QCOW2_MAX_L1_BYTES          (32u * 1024 * 1024)
#define QCOW2_MAX_REFTABLE_BYTES    (8u * 1024 * 1024)
#define QCOW2_MAX_SNAPSHOTS         65536u
#define QCOW2_MAX_SNAPSHOT_EXTRA    1024u
#define QCOW2_MAX_SNAPSHOT_TABLE    (64u * 1024 * 1024)
#define QCOW2_MAX_BACKING_NAME      1023u
#define QCOW2_MAX_BACKING_FORMAT    15u     /* QEMU: length must be < 16 */
#define QCOW2_MAX_CHAIN_DEPTH       16
#define QCOW2_MAX_HOST_OFFSET       ((1ull << 56) - 1)

#define L1E_OFFSET_MASK             0x00fffffffffffe00ull
#define L1E_RESERVED_MASK           0x7f000000000001ffull
#define L2E_OFFSET_MASK             0x00fffffffffffe00ull
#define L2E_RESERVED_MASK           0x3f000000000001feull
#define REFT_OFFSET_MASK            0xfffffffffffffe00ull
#define REFT_RESERVED_MASK          0x00000000000001ffull
#define QCOW_OFLAG_COPIED           (1ull << 63)
#define QCOW_OFLAG_COMPRESSED       (1ull << 62)
#define QCOW_OFLAG_ZERO             (1ull << 0)

#define INCOMPAT_DIRTY              QCOW2_INCOMPAT_DIRTY
#define INCOMPAT_CORRUPT            QCOW2_INCOMPAT_CORRUPT
#define INCOMPAT_DATA_FILE          QCOW2_INCOMPAT_DATA_FILE
#define INCOMPAT_COMPRESSION        QCOW2_INCOMPAT_COMPRESSION
#define INCOMPAT_EXTL2              QCOW2_INCOMPAT_EXTL2
#define INCOMPAT_KNOWN              0x1full
#define COMPAT_LAZY_REFCOUNTS       QCOW2_COMPAT_LAZY_REFCOUNTS
#define AUTOCLEAR_BITMAPS           QCOW2_AUTOCLEAR_BITMAPS
#define AUTOCLEAR_DATA_FILE_RAW     QCOW2_AUTOCLEAR_DATA_FILE_RAW

#define EXT_END                     0x00000000u
#define EXT_BACKING_FORMAT          0xE2792ACAu
#define EXT_FEATURE_TABLE           0x6803F857u
#define EXT_BITMAPS                 0x23852875u
#define EXT_CRYPTO_HEADER           0x0537BE77u
#define EXT_DATA_FILE               0x44415441u

#define COMPRESSION_ZLIB            QCOW2_COMPRESSION_ZLIB
#define COMPRESSION_ZSTD            QCOW2_COMPRESSION_ZSTD

#define CRYPT_NONE                  QCOW2_CRYPT_NONE
#define CRYPT_AES                   QCOW2_CRYPT_AES
#define CRYPT_LUKS                  QCOW2_CRYPT_LUKS

/* ---- I/O backends (io.c) ------------------------------------------------ */
typedef struct qcow2_io qcow2_io;

typedef struct qcow2_io_ops {
    /* Up to len bytes at offset into buf: bytes read (fewer only at end of
     * file), or a negative status. */
    int64_t (*pread)(qcow2_io *io, void *buf, size_t len, uint64_t offset);
    /* All len bytes, or a negative status (QCOW2_E_READONLY on a
     * read-only backend). */
    int (*pwrite)(qcow2_io *io, const void *buf, size_t len,
                  uint64_t offset);
    int (*flush)(qcow2_io *io);
    int (*truncate)(qcow2_io *io, uint64_t size);
    int (*size)(qcow2_io *io, uint64_t *out);
    /* Bytes the host filesystem allocated (st_blocks * 512). */
    int (*allocated)(qcow2_io *io, uint64_t *out);
    void (*close)(qcow2_io *io);
} qcow2_io_ops;

struct qcow2_io {
    const qcow2_io_ops *ops;
    int read_only;
    int last_errno;         /* errno of the last failed call, for messages */
    uint64_t dev, ino;      /* file identity (loop detection); 0 in memory */
    /* Calls that reached this backend (img:stats()). */
    uint64_t reads, bytes_read, writes, bytes_written;
};

/* Open path O_RDONLY (read_write 0) or O_RDWR. Missing file:
 * QCOW2_E_NOTFOUND; *sys_errno gets errno on failure. */
int qcow2_io_open_file(const char *path, int read_write, qcow2_io **out,
                       int *sys_errno);
/* A growable in-memory file holding a copy of data, at most 256 MiB
 * (growing past it: QCOW2_E_NOSPC). */
int qcow2_io_open_memory(const void *data, size_t len, int read_write,
                         qcow2_io **out);
void qcow2_io_close(qcow2_io *io);

/* ---- Errors (error.c) ------------------------------------------------- */
/* Format one line into err; returns code. */
int qcow2_error_set(qcow2_error *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Set img->err to "<path>: <message>"; returns code. The arguments may
 * point into img->err.msg (formatted before it is overwritten). */
int qcow2_fail(qcow2_image *img, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* The text of errno value sys_errno, thread safe (never strerror): a
 * pointer to a constant string or into buf. 0 reads as "I/O error". */
const char *qcow2_errno_text(int sys_errno, char *buf, size_t len);

/* ---- Tolerated damage (damage.c) ------------------------------------- */
/* 1 when the open takes what QEMU takes: an open for repair, or any
 * read-only open (tables the active disk does not need may be damaged). */
int qcow2_open_is_lenient(const qcow2_image *img);
/* Keep img->err's message as tolerated damage and clear the error. */
void qcow2_note_damage(qcow2_image *img);
void qcow2_damage_free(qcow2_image *img);

/* ---- Parsed structures ---------------------------------------------------- */
typedef struct qcow2_snapshot {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint32_t vm_state_size32;
    uint64_t vm_state_size;     /* 64-bit extra field when present */
    uint32_t extra_data_size;
    uint8_t *extra_data;        /* all extra bytes, kept for rewrites */
    int has_disk_size;
    uint64_t disk_size;
    int has_icount;
    int64_t icount;
    uint64_t entry_offset;      /* host offset of the entry */
    uint32_t entry_length;      /* bytes, without the padding */
} qcow2_snapshot;

typedef struct qcow2_l2_cache qcow2_l2_cache;   /* l2_cache.c */
typedef struct qcow2_codec qcow2_codec;         /* compress.c */
typedef struct qcow2_crypto qcow2_crypto;       /* crypto.c */
typedef struct qcow2_refcount_cache qcow2_refcount_cache; /* refcount_cache.c */
typedef struct qcow2_refcount_codec qcow2_refcount_codec; /* refcount_codec.h */

struct qcow2_image {
    qcow2_error err;            /* last failure of a call on this handle */
    char *path;                 /* as given by the caller */
    char *dir;                  /* its folder: backing names resolve here */
    qcow2_io *io;               /* the image file */
    int owns_io;                /* 0 for snapshot views */
    qcow2_io *data_io;          /* guest data clusters: io, or the external
                                   data file */
    int owns_data_io;
    int is_raw;                 /* raw image (a backing file): no metadata */
    int read_only;
    int force_share;            /* opened with -U: shares all (lock.c) */
    int is_snapshot_view;
    int in_memory;              /* qcow2_open_memory: no files followed */
    int depth;                  /* 0 = top of the chain */

    qcow2_header hdr;           /* as parsed (v2 defaults filled in) */
    uint64_t file_size;         /* at open */

    /* Geometry derived from the header at open. */
    uint32_t cluster_bits;
    uint64_t cluster_size;
    int extended_l2;
    uint32_t l2_entry_bytes;    /* 8, or 16 with extended L2 */
    uint32_t l2_bits;           /* log2 of entries per L2 table */
    uint64_t l2_entries;
    uint32_t subcluster_bits;   /* log2 of subcluster size (= cluster_bits
                                   without extended L2) */
    uint64_t subcluster_size;
    uint32_t refcount_bits;
    /* packs and unpacks refcount entries of this width (chosen at open) */
    const qcow2_refcount_codec *refcount_codec;
    uint64_t refblock_entries;
    uint64_t size;              /* virtual size (a view: the snapshot's) */
    int compression_type;

    qcow2_header_extension *exts;   /* every extension, in file order */
    size_t n_exts;
    qcow2_feature_name *features;
    size_t n_features;
    qcow2_ext_info ext;         /* pointers into owned strings below */
    char *backing_format_ext;
    char *data_file_ext;

    uint64_t *l1;               /* active L1 (a view: the snapshot's) */
    uint32_t l1_size;
    uint64_t *reftable;
    uint64_t reftable_entries;
    qcow2_snapshot *snapshots;
    uint32_t nb_snapshots;

    char *backing_name;         /* from the header, NULL if none */
    qcow2_image *backing;       /* opened chain, NULL if none/closed */
    int owns_backing;           /* 0 for snapshot views */

    qcow2_l2_cache *l2_cache;
    uint64_t l2_cache_bytes;
    qcow2_codec *codec;         /* created on the first compressed read */
    qcow2_crypto *crypto;       /* encrypted images: keys (crypto.c) */
    int owns_crypto;            /* 0 for snapshot views */
    struct qcow2_write_state *ws;  /* read-write handles only (overlap.h) */
    int open_for_repair;        /* rw + repair: tolerate what check -r all
                                   fixes (QEMU's BDRV_O_CHECK) */
    char *damage[8];            /* what a lenient open tolerated (damage.c) */
    size_t n_damage;
    uint32_t snapshot_extra_dropped; /* entries whose extra data past QEMU's
                                   1024 bytes was cut at load (repair only) */
    /* Added by the refcount-cache work (refcount_cache.c): created on
     * first use, freed by qcow2_close; never on views or raw images. */
    qcow2_refcount_cache *refcount_cache;
    uint64_t refcount_cache_bytes;  /* open option; 0 = default */
    /* Told of every write of the image file qcow2_write_checked makes (ok:
     * it succeeded). The refcount-block cache registers here when it is
     * created, so the write funnel (layer 2) calls no cache (layer 4). */
    void (*write_observer)(void *ctx, uint64_t offset, const void *buf,
                           size_t length, int ok);
    void *write_observer_ctx;
};

#endif /* QCOW2_INTERNAL_H */
