/*
 * Engine-internal types and the functions one engine file offers another.
 * Nothing in here is seen by the binding except through csrc/qcow2.h.
 *
 * Ownership of work: io.c error.c header.c refcount.c snapshot_table.c image.c
 * (open/close/chain/validation) and l2_cache.c cluster.c compress.c read.c
 * map.c (guest lookups) meet only through what is declared here.
 */
#ifndef QCOW2_INTERNAL_H
#define QCOW2_INTERNAL_H

#include <stdarg.h>
#include <stdint.h>
#include <stddef.h>

#include "../qcow2.h"
#include "util.h"
#include "refcount_codec.h"

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
typedef struct qcow2_refcount_cache qcow2_refcount_cache; /* refcount_cache.c */

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
    struct qcow2_write_state *ws;  /* read-write handles only (write.h) */
    int open_for_repair;        /* rw + repair: tolerate what check -r all
                                   fixes (QEMU's BDRV_O_CHECK) */
    uint32_t snapshot_extra_dropped; /* entries whose extra data past QEMU's
                                   1024 bytes was cut at load (repair only) */
    /* Added by the refcount-cache work (refcount_cache.c): created on
     * first use, freed by qcow2_close; never on views or raw images. */
    qcow2_refcount_cache *refcount_cache;
    uint64_t refcount_cache_bytes;  /* open option; 0 = default */
};

/* ---- Metadata reads: meta_io.h (layer 2), here for the files that
 * still reach it through this header. */
#include "meta_io.h"

/* ---- Caches and codecs (l2_cache.c, compress.c) ----------------------- */
/* An L2 table cache holding at most `bytes` of tables (at least 2). */
int qcow2_l2_cache_new(qcow2_image *img, uint64_t bytes,
                       qcow2_l2_cache **out);
void qcow2_l2_cache_free(qcow2_l2_cache *cache);
void qcow2_codec_free(qcow2_codec *codec);

/* Default L2 cache bytes for img: enough to map the whole disk, capped at
 * 32 MiB as QEMU 7.2 caps it, at least 2 tables. */
uint64_t qcow2_default_l2_cache_bytes(const qcow2_image *img);

/* ---- Header (header.c) ------------------------------------------------ */
/* Parse and validate the header and extensions of img->io into img
 * (geometry fields too). Refuses what QEMU refuses, naming the field. */
int qcow2_header_load(qcow2_image *img);
void qcow2_header_free(qcow2_image *img);

/* The feature names QEMU 7.2 writes in its feature-name table, in its
 * order (header.c): names for images without a table, and the table
 * header_write.c writes. */
#define QCOW2_KNOWN_FEATURES 8
typedef struct qcow2_known_feature {
    uint8_t type;               /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    const char *name;
} qcow2_known_feature;
extern const qcow2_known_feature qcow2_known_features[QCOW2_KNOWN_FEATURES];

/* ---- Geometry (geometry.c) -------------------------------------------- */
/* log2 of the entries of one L2 table. */
uint32_t qcow2_l2_bits_for(uint32_t cluster_bits, int extended_l2);
/* Every geometry field of img (cluster, L2, subcluster and refcount-block
 * sizes) from the three header fields that fix them (already validated). */
void qcow2_geometry_set(qcow2_image *img, uint32_t cluster_bits,
                        int extended_l2, uint32_t refcount_order);
/* L1 entries that map `size` guest bytes with this geometry (no limit
 * applied: qcow2_l1_entries_needed and create apply theirs). */
uint64_t qcow2_l1_entries_for(uint32_t cluster_bits, uint32_t l2_bits,
                              uint64_t size);

/* ---- Refcounts (refcount.c) ------------------------------------------ */
int qcow2_reftable_load(qcow2_image *img);
/* Clusters [0, end_cluster) whose refcount is not zero, reading each
 * refcount block once. */
int qcow2_count_used_clusters(qcow2_image *img, uint64_t end_cluster,
                              uint64_t *out);

/* ---- Refcount-block cache (refcount_cache.c) -------------------------
 * Write-through: cached blocks always hold the bytes on disk; writers
 * keep it so through qcow2_write_checked (see write.h). */
/* Bytes [byte_start, byte_start+len) of the refcount block at
 * block_offset: from the cache (the whole block read once on a miss), or
 * straight from the file (views, raw images, blocks cut short by the end
 * of the file). Errors as qcow2_read_meta's ("refcount block"). */
int qcow2_refcount_block_read(qcow2_image *img, uint64_t block_offset,
                              uint64_t byte_start, void *buf, size_t len);
void qcow2_refcount_cache_free(qcow2_refcount_cache *cache);
/* QEMU 7.2's default: 4 clusters. */
uint64_t qcow2_default_refcount_cache_bytes(const qcow2_image *img);

/* ---- Guest lookups: L2 cache and codecs (cache.c, compress.c) ---------
 * Added by the read-path work (l2_cache.c cluster.c compress.c read.c map.c).
 */
/* The L2 table at host offset l2_offset: one whole cluster, big-endian as
 * on disk, from img->l2_cache or read with qcow2_read_meta on a miss. The
 * pointer is valid until the next call on the cache. img->l2_cache is
 * created on first use when the open path did not (img->l2_cache_bytes,
 * or the default). The caller validated l2_offset (aligned, inside the
 * file, not cluster 0). */
int qcow2_l2_cache_get(qcow2_image *img, uint64_t l2_offset,
                       uint8_t **table);
/* Forget the cached copy of one table (rewritten behind the cache's
 * back) or of every table. NULL cache: nothing to do. */
void qcow2_l2_cache_drop(qcow2_l2_cache *cache, uint64_t l2_offset);
void qcow2_l2_cache_drop_all(qcow2_l2_cache *cache);

/* Decompress the compressed cluster whose stream starts at host byte
 * coffset with csize bytes at most (the L2 entry's upper bound; the file
 * may end sooner). *cluster gets cluster_size bytes owned by img->codec,
 * valid until the next codec call. The last cluster decompressed is kept,
 * so reading it again costs nothing. guest_offset is for messages. */
int qcow2_decompress_cluster(qcow2_image *img, uint64_t coffset,
                             uint64_t csize, uint64_t guest_offset,
                             const uint8_t **cluster);
/* Drop the kept decompressed cluster (a writer reused its host bytes). */
void qcow2_codec_forget(qcow2_codec *codec);

/* qcow2_compress_cluster's "keep it uncompressed" answer (not an error). */
#define QCOW2_DOES_NOT_SHRINK 1
/* Compress one cluster (cluster_size bytes at src) with the image's
 * compression type, as QEMU writes it: deflate raw (level default,
 * windowBits -12, memLevel 9) or zstd level 3, one frame. At most
 * min(dst_cap, cluster_size - 1) bytes go to dst; *dst_len gets the
 * stream length. Returns 0, QCOW2_DOES_NOT_SHRINK when the stream does
 * not fit, or a negative status. */
int qcow2_compress_cluster(qcow2_image *img, const void *src, void *dst,
                           size_t dst_cap, size_t *dst_len);

/* ---- Open-path helpers (header.c, image.c; added by the open work) -----
 * qcow2_header_load expects img->io and img->file_size to be set. */
/* A metadata table of `length` bytes at `offset`: cluster aligned, inside
 * the file, clear of cluster 0 (QCOW2_E_CORRUPT naming `what`). An empty
 * table only has to be aligned. */
int qcow2_check_table(qcow2_image *img, const char *what, uint64_t offset,
                      uint64_t length);
/* QCOW2_E_CORRUPT when two tables share a byte. */
int qcow2_check_tables_apart(qcow2_image *img, const char *what_a,
                             uint64_t a, uint64_t a_length,
                             const char *what_b, uint64_t b,
                             uint64_t b_length);
/* L1 entries needed to map `size` guest bytes; QCOW2_E_CORRUPT (no
 * message) when that exceeds INT32_MAX, as QEMU refuses. */
int qcow2_l1_entries_needed(const qcow2_image *img, uint64_t size,
                            uint64_t *entries);

#endif /* QCOW2_INTERNAL_H */
