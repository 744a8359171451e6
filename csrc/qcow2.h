/*
 * lua-qcow2 engine: the one public header.
 *
 * Opaque handles, every call returns 0 (or a count) on success and a
 * negative QCOW2_E_* code on failure; the failing call leaves one line in
 * the handle's error buffer (qcow2_errmsg) naming the file and the field or
 * offset at fault.
 *
 * Threads: the library has no global or static mutable state (errno texts
 * come from strerror_r, never strerror), so independent handles (each
 * from its own qcow2_open or qcow2_create) may be used from different
 * threads at once. A handle is not internally locked: one thread at a
 * time per handle. That unit includes everything the handle shares state
 * with: its backing chain (qcow2_backing: caches, error buffers), and its
 * snapshot views (qcow2_snapshot_open), which share the parent's file,
 * I/O state (last errno, trace, fault plan) and backing chain. A handle,
 * its backing images and its views are used by one thread at a time.
 */
#ifndef QCOW2_H
#define QCOW2_H

#include <stddef.h>
#include <stdint.h>

#define QCOW2_LIB_VERSION "0.1.0"

enum qcow2_status {
    QCOW2_OK = 0,
    QCOW2_E_IO = -1,
    QCOW2_E_NOSPC = -2,
    QCOW2_E_NOTFOUND = -3,
    QCOW2_E_EXISTS = -4,
    QCOW2_E_INVALID = -5,
    QCOW2_E_CORRUPT = -6,
    QCOW2_E_UNSUPPORTED = -7,
    QCOW2_E_READONLY = -8,
    QCOW2_E_KEY = -9,
    QCOW2_E_NOMEM = -10,
    QCOW2_E_BUSY = -11,
};

/* The API's code string for a status ("io", "corrupt", ...). */
const char *qcow2_status_name(int status);

#define QCOW2_ERRMSG_MAX 512
typedef struct qcow2_error {
    int code;                       /* QCOW2_E_* or 0 */
    char msg[QCOW2_ERRMSG_MAX];     /* one line, no trailing newline */
} qcow2_error;

typedef struct qcow2_image qcow2_image;

/*
 * Backing-file resolver: given the name stored in the image, its format
 * (may be NULL) and the depth of the image that names it (0 = top), write
 * the path to open into out (NUL terminated) and return 0, or write a
 * reason into why and return a negative status to refuse.
 */
typedef int (*qcow2_resolve_fn)(void *ctx, const char *name,
                                const char *format, int depth,
                                char *out, size_t out_len,
                                char *why, size_t why_len);

typedef struct qcow2_open_opts {
    int read_write;             /* 0: O_RDONLY, never writes a byte */
    int no_backing;             /* 1: leave the backing chain closed */
    int allow_raw;              /* 1: a file without the qcow2 magic opens
                                   as a raw image; 0: refused ("invalid") */
    int force_share;            /* QEMU's -U (read-only opens only): open
                                   even while another process or handle
                                   writes the image (reads may then be
                                   inconsistent); else such an open fails
                                   with QCOW2_E_BUSY */
    qcow2_resolve_fn resolve;   /* NULL: plain names next to the image */
    void *resolve_ctx;
    uint64_t l2_cache_size;     /* bytes; 0 = default */
    uint64_t refcount_cache_size; /* bytes; 0 = default */
    /* Read-write runtime options (QEMU's of the same names). */
    int repair;                 /* open for repair: corrupt bit allowed rw,
                                   a dirty image is not repaired at open */
    int lazy_refcounts;         /* -1 = as the header says, 0/1 */
    int overlap_check;          /* -1 default ("cached"); else 0 none,
                                   1 constant, 2 cached, 3 all */
    int discard;                /* pass discards down to the file */
    /* Metadata cache mode: 0 "writeback" (dirty L2 tables and refcount
     * blocks stay in memory until flush, eviction or close), 1
     * "writethrough" (every call durable on return), 2 "unsafe" (write-back,
     * and never synced). Read-only handles ignore it. */
    int cache_mode;
    /* Fault plan for tests (the Lua `io` option). */
    int64_t fail_after_writes;  /* -1: never */
    int fail_status;            /* QCOW2_E_IO or QCOW2_E_NOSPC */
    int64_t stop_after_writes;  /* -1: never (power cut after N writes) */
    int volatile_cache;         /* at the cut, writes since the last flush:
                                   0 kept, 1 each lost by a coin seeded
                                   with volatile_seed, 2 all lost; needs
                                   stop_after_writes */
    uint64_t volatile_seed;
    int trace_writes;           /* record writes, truncates and flushes */
    /* The external data file of the top image, opened as given (NULL:
     * the name the image stores, under the backing-file policy: plain
     * names next to the image, never json: or protocol names; the
     * resolver is for backing files only). Refused (QCOW2_E_INVALID) for
     * an image without the data-file bit. Backing images use their own. */
    const char *data_file;
    /* Passphrase of an encrypted image (AES or LUKS), key_len bytes; not
     * kept: the engine keeps only derived keys, and cleanses them. The
     * backing chain gets it too. NULL: none (encrypted images refused
     * with QCOW2_E_KEY). */
    const char *key;
    size_t key_len;
} qcow2_open_opts;

/* Fill opts with the defaults (read-only, backing chain opened). */
void qcow2_open_opts_init(qcow2_open_opts *opts);

/*
 * Open an image file. A qcow2 file is parsed and validated; any other file
 * is opened as a raw image (format "raw"). On failure *out is NULL and err
 * holds the code and message.
 */
int qcow2_open(const char *path, const qcow2_open_opts *opts,
               qcow2_image **out, qcow2_error *err);

/*
 * Open an image held in memory: a private copy of data[0, len) (read-write
 * handles grow and write the copy, never data). The backing chain and an
 * external data file are never followed (there is no folder to find them
 * in): opts->no_backing is implied; an image needing a data file fails
 * with QCOW2_E_UNSUPPORTED. Fuzzing harnesses and tests use it.
 */
int qcow2_open_memory(const void *data, size_t len,
                      const qcow2_open_opts *opts, qcow2_image **out,
                      qcow2_error *err);

/* Idempotent release of the handle and everything it owns (backing chain,
 * caches). Views opened from it must be closed first. */
void qcow2_close(qcow2_image *img);

/* "qcow2" (*version set) or "raw"; NULL with err set when unreadable. */
const char *qcow2_probe(const char *path, uint32_t *version,
                        qcow2_error *err);

/* The message and code of the handle's last failure. */
const char *qcow2_errmsg(const qcow2_image *img);
int qcow2_errcode(const qcow2_image *img);

/* --- Properties --------------------------------------------------------- */
const char *qcow2_path(const qcow2_image *img);
const char *qcow2_format(const qcow2_image *img);     /* "qcow2" | "raw" */
uint64_t qcow2_virtual_size(const qcow2_image *img);
uint64_t qcow2_cluster_size(const qcow2_image *img);  /* 0 for raw */
uint32_t qcow2_version(const qcow2_image *img);       /* 0 for raw */
int qcow2_is_read_only(const qcow2_image *img);
const char *qcow2_backing_name(const qcow2_image *img);   /* NULL if none */
const char *qcow2_backing_format(const qcow2_image *img); /* NULL if none */
/* QEMU's path_has_protocol: a ':' before any '/' ("nbd://x", "json:{}"). */
int qcow2_has_protocol(const char *name);
/* Damage a read-only open tolerated, as QEMU opens such images (a
 * refcount or snapshot table outside the file, over the header or over
 * another table): one-line messages, none on a healthy image. */
size_t qcow2_open_damage_count(const qcow2_image *img);
const char *qcow2_open_damage(const qcow2_image *img, size_t index);
/* The opened backing image (NULL if none or not opened). Owned by img. */
qcow2_image *qcow2_backing(const qcow2_image *img);
/* Size of the file on disk in bytes (stat st_size). */
int qcow2_file_size(qcow2_image *img, uint64_t *out);
/* Bytes allocated on the host filesystem (st_blocks * 512), as qemu-img
 * info's actual-size. */
int qcow2_allocated_file_size(qcow2_image *img, uint64_t *out);

/* --- Guest data ---------------------------------------------------------- */
/*
 * Read guest bytes [offset, offset+length) into buf, through the backing
 * chain. The range must lie inside the virtual size (QCOW2_E_INVALID
 * otherwise). A bad table entry met on the way fails with QCOW2_E_CORRUPT.
 */
int qcow2_read(qcow2_image *img, uint64_t offset, void *buf, size_t length);

/*
 * As qcow2_read, but a range whose metadata cannot be followed (a bad L1
 * or L2 entry, an unreadable L2 table, a compressed cluster that does not
 * decompress), at any level of the chain, reads as zeroes and is reported:
 * fn(ctx, start, length, unit_start, reason) per damaged run, in order;
 * unit_start is the start of the damaged unit (cluster or L1 entry range)
 * the run lies in, so that pieces of one unit cut by the caller's reads
 * can be joined. reason is the one-line message qcow2_read would have
 * failed with, valid during the call. fn returns 0 to go on, non-zero to
 * stop (returned). Other failures (I/O, encrypted data) fail as in
 * qcow2_read.
 */
typedef int (*qcow2_damage_fn)(void *ctx, uint64_t start, uint64_t length,
                               uint64_t unit_start, const char *reason);
int qcow2_read_salvage(qcow2_image *img, uint64_t offset, void *buf,
                       size_t length, qcow2_damage_fn fn, void *ctx);

/* --- Bulk reads ------------------------------------------------------------ */
/*
 * A sequential read of guest [offset, offset+length) handed out chunk by
 * chunk, in order, while worker threads decompress the compressed
 * clusters of the chunk ahead (digests, exports). The workers never touch
 * the handle or any caller state: the calling thread reads the compressed
 * streams, the workers only inflate them into the stream's own buffers.
 * threads: 0 = one per online CPU besides the calling thread (which
 * inflates too while it waits), > 0 that many, < 0 none (everything on
 * the calling thread); they start with the first compressed cluster. fn
 * and ctx as qcow2_read_salvage (NULL: damage fails the read); fn is
 * called on the calling thread, in guest order.
 * Until qcow2_bulk_close, the handle is used by the stream only (between
 * qcow2_bulk_read calls, the caller may use it).
 */
typedef struct qcow2_bulk qcow2_bulk;
int qcow2_bulk_open(qcow2_image *img, uint64_t offset, uint64_t length,
                    int threads, qcow2_damage_fn fn, void *ctx,
                    qcow2_bulk **out);
/* The next chunk: 0 with *data and *len set (valid until the next call;
 * *len == 0 at the end), a negative status (message in qcow2_errmsg), or
 * fn's non-zero stop value. After a failure every call returns it again. */
int qcow2_bulk_next(qcow2_bulk *b, const void **data, size_t *len);
/* Guest [offset, offset+len) into buf, as qcow2_read_salvage with the
 * stream's fn, its compressed clusters inflated by the stream's workers
 * and the calling thread (convert reads its source so). A stream opened
 * with length 0 serves only these reads; failures are not kept. */
int qcow2_bulk_read(qcow2_bulk *b, uint64_t offset, void *buf, size_t len);
/* Stops the workers and frees the stream. NULL: nothing. */
void qcow2_bulk_close(qcow2_bulk *b);

/* --- Map ------------------------------------------------------------------ */
enum qcow2_extent_type {
    QCOW2_EXTENT_DATA = 0,
    QCOW2_EXTENT_ZERO = 1,
    QCOW2_EXTENT_UNALLOCATED = 2,
    QCOW2_EXTENT_COMPRESSED = 3,
    QCOW2_EXTENT_CORRUPT = 4,       /* metadata that cannot be followed */
};

typedef struct qcow2_extent {
    uint64_t start;             /* guest offset */
    uint64_t length;            /* guest bytes */
    int type;                   /* enum qcow2_extent_type */
    int depth;                  /* chain level holding it; for unallocated,
                                   the deepest level looked at (qemu-img) */
    int has_offset;             /* 1: offset is meaningful */
    uint64_t offset;            /* host offset in the image at depth */
    uint64_t compressed_size;   /* compressed: bytes of the stream's sectors */
    int reads_zero;             /* data: the host range is a hole (or past
                                   EOF) of a file QEMU guesses to be
                                   metadata-preallocated; qemu-img map shows
                                   "data": true, "zero": true */
    const char *reason;         /* corrupt: the one-line message a read of
                                   the range fails with; valid only during
                                   the callback. NULL otherwise */
} qcow2_extent;

/*
 * Call fn once per extent covering guest [offset, offset+length), in order,
 * with adjacent extents of the same type and depth and contiguous host
 * offsets already merged (as qemu-img map merges). fn returns 0 to go on,
 * non-zero to stop (that value is returned). Through the backing chain.
 */
typedef int (*qcow2_extent_fn)(void *ctx, const qcow2_extent *extent);
int qcow2_map(qcow2_image *img, uint64_t offset, uint64_t length,
              qcow2_extent_fn fn, void *ctx);

/* --- Diff ------------------------------------------------------------------ */
/*
 * Guest ranges whose bytes differ between a and b: any two images or
 * views (snapshot views, backing images, unrelated files). fn gets each
 * range in order, at 512-byte sector precision (a sector is reported when
 * any byte in it differs; ranges are sector aligned, adjacent ones merged,
 * the last one ends at the larger virtual size). Sizes may differ: the
 * shorter side reads as zeroes past its end (qemu-img compare). Maps come
 * first: ranges both sides resolve to zeroes, or to the same host bytes
 * of the same file, are equal without a read; bytes are read only where
 * that fails. fn returns 0 to go on, non-zero to stop (that value is
 * returned). Failures are reported on a. stats (may be NULL) counts the
 * work.
 */
typedef struct qcow2_diff_stats {
    uint64_t bytes_read;        /* guest bytes read, both sides summed */
    uint64_t bytes_by_map;      /* guest bytes found equal from the maps */
} qcow2_diff_stats;
typedef int (*qcow2_range_fn)(void *ctx, uint64_t start, uint64_t length);
int qcow2_diff(qcow2_image *a, qcow2_image *b, qcow2_range_fn fn, void *ctx,
               qcow2_diff_stats *stats);

/* --- Compare, convert, measure (qemu-img's lifecycle commands) ---------- */
/*
 * qemu-img compare: QCOW2_COMPARE_EQUAL, or why not with *offset set to
 * the first differing 512-byte sector's guest offset (content), the
 * chunk start where the block status differs (strict: status), or the
 * smaller size (strict: size). Not strict, sizes may differ: the shorter
 * side reads as zeroes past its end. Failures are reported on a.
 */
enum qcow2_compare_result {
    QCOW2_COMPARE_EQUAL = 0,
    QCOW2_COMPARE_CONTENT = 1,
    QCOW2_COMPARE_SIZE = 2,
    QCOW2_COMPARE_STATUS = 3,
};
int qcow2_compare(qcow2_image *a, qcow2_image *b, int strict,
                  uint64_t *offset);

/*
 * qemu-img convert, in steps: src's guest bytes (an image with its chain,
 * or a snapshot view) into dst, a fresh read-write image (qcow2 or raw)
 * at least as large. Sparse: unallocated and zero ranges are not
 * written. qcow2_convert_step does one bounded piece of work (a chunk of
 * at most a few MiB, or one look at the map) and returns 1 while there is
 * more, 0 once everything is written and dst flushed, or a negative
 * status (qcow2_convert_errmsg). The caller removes a failed output.
 * A converter uses src, dst and dst's backing chain: one thread at a
 * time for all of them (compression workers touch no handle).
 */
typedef struct qcow2_convert_opts {
    int compress;               /* qcow2 dst: compressed clusters */
    int threads;                /* compression threads; 0: online CPUs */
    int only_differences;       /* write only what differs from dst's
                                   backing image (qemu-img convert -B) */
    int unsafe;                 /* dst never synced (qemu-img convert's
                                   default -t unsafe): no flush between
                                   steps, at the end or at close; 0: dst
                                   flushed as usual and at the end */
} qcow2_convert_opts;
typedef struct qcow2_convert qcow2_convert;
int qcow2_convert_begin(qcow2_image *src, qcow2_image *dst,
                        const qcow2_convert_opts *opts, qcow2_convert **out);
int qcow2_convert_step(qcow2_convert *cv);
void qcow2_convert_progress(const qcow2_convert *cv, uint64_t *done,
                            uint64_t *total);
const char *qcow2_convert_errmsg(const qcow2_convert *cv);
void qcow2_convert_free(qcow2_convert *cv);

/*
 * qemu-img measure (QEMU 7.2's qcow2_measure): the file size a new image
 * of opts needs (size, cluster_size, refcount_bits, extended_l2,
 * preallocation, version, backing_file are read), for the data of `from`
 * when given (an image with its chain, or a snapshot view; opts->size
 * is then ignored). bitmaps_of (NULL: from) is the image itself when
 * from is its snapshot view: its virtual size is the one measured, as
 * qemu-img measure -l does. bitmaps: the persistent bitmaps of it,
 * counted when has_bitmaps (a v3 output and a v3 qcow2
 * input, as qemu-img prints them).
 */
typedef struct qcow2_measure_result {
    uint64_t required;
    uint64_t fully_allocated;
    int has_bitmaps;
    uint64_t bitmaps;
} qcow2_measure_result;
struct qcow2_create_opts;
int qcow2_measure(const struct qcow2_create_opts *opts, qcow2_image *from,
                  qcow2_image *bitmaps_of, qcow2_measure_result *out,
                  qcow2_error *err);

/* --- Raw structures, for inspection ---------------------------------------- */
typedef struct qcow2_header {
    uint32_t magic;
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    /* v3 (v2 images: features 0, refcount_order 4, header_length 72) */
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;   /* 0 when the field is absent */
} qcow2_header;

/* The format's values for the fields above (the engine's internal names
 * are these; the binding reads headers with them, never with literals). */
#define QCOW2_INCOMPAT_DIRTY            (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT          (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE        (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION      (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2            (1ull << 4)
#define QCOW2_COMPAT_LAZY_REFCOUNTS     (1ull << 0)
#define QCOW2_AUTOCLEAR_BITMAPS         (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_FILE_RAW   (1ull << 1)
#define QCOW2_CRYPT_NONE                0u
#define QCOW2_CRYPT_AES                 1u
#define QCOW2_CRYPT_LUKS                2u
#define QCOW2_COMPRESSION_ZLIB          0
#define QCOW2_COMPRESSION_ZSTD          1

typedef struct qcow2_header_extension {
    uint32_t magic;
    uint32_t length;
    uint64_t file_offset;       /* where its data starts in the file */
    uint8_t *data;              /* length bytes */
} qcow2_header_extension;

typedef struct qcow2_feature_name {
    uint8_t type;               /* 0 incompatible, 1 compatible, 2 autoclear */
    uint8_t bit;
    char name[47];              /* NUL terminated */
} qcow2_feature_name;

/* Raw views of the parsed header; NULL/0 for raw images. Owned by img. */
const qcow2_header *qcow2_get_header(const qcow2_image *img);
size_t qcow2_extension_count(const qcow2_image *img);
const qcow2_header_extension *qcow2_extension(const qcow2_image *img,
                                              size_t index);
size_t qcow2_feature_name_count(const qcow2_image *img);
const qcow2_feature_name *qcow2_feature_name_at(const qcow2_image *img,
                                                size_t index);
/* Name of a feature bit: from the image's table, else QEMU's known names,
 * else NULL. kind: 0 incompatible, 1 compatible, 2 autoclear. */
const char *qcow2_feature_bit_name(const qcow2_image *img, int kind, int bit);

/* Parsed special extensions; fields are zero/NULL when absent. */
typedef struct qcow2_ext_info {
    const char *backing_format;     /* 0xE2792ACA */
    const char *data_file;          /* 0x44415441 */
    int has_crypto_header;          /* 0x0537BE77 */
    uint64_t crypto_header_offset;
    uint64_t crypto_header_length;
    int has_bitmaps;                /* 0x23852875 */
    uint32_t nb_bitmaps;
    uint64_t bitmap_directory_size;
    uint64_t bitmap_directory_offset;
} qcow2_ext_info;
const qcow2_ext_info *qcow2_get_ext_info(const qcow2_image *img);

/* Active L1 entries (raw on-disk values, host byte order). */
uint32_t qcow2_l1_size(const qcow2_image *img);
int qcow2_l1_entry(qcow2_image *img, uint32_t l1_index, uint64_t *entry);
/*
 * Raw entries of the L2 table that l1_index points to: *count entries of
 * 64 bits (2 per guest cluster with extended L2) written into out, which
 * must hold cluster_size/8 words. *count is 0 when the L1 entry is empty.
 */
int qcow2_l2_table(qcow2_image *img, uint32_t l1_index, uint64_t *out,
                   size_t *count);
/* Refcount of a host cluster (0 past the refcount table). */
int qcow2_refcount(qcow2_image *img, uint64_t host_cluster, uint64_t *out);

/* --- Snapshots --------------------------------------------------------------- */
typedef struct qcow2_snapshot_info {
    const char *id;
    const char *name;
    uint32_t date_sec;
    uint32_t date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;         /* the image size when absent from the entry */
    int has_icount;
    int64_t icount;
    uint64_t l1_table_offset;
    uint32_t l1_size;
    uint32_t extra_data_size;
    const uint8_t *extra_data;  /* extra_data_size bytes as stored (NULL
                                   when 0); owned by img */
    uint64_t entry_offset;      /* host offset of the table entry */
    uint32_t entry_length;      /* its bytes on disk, padding excluded */
} qcow2_snapshot_info;

uint32_t qcow2_snapshot_count(const qcow2_image *img);
/* Bytes of the snapshot table on disk, padding after the last entry
 * excluded (QEMU's snapshots_size; 0 without snapshots). */
uint64_t qcow2_snapshot_table_size(const qcow2_image *img);
int qcow2_snapshot_get(const qcow2_image *img, uint32_t index,
                       qcow2_snapshot_info *out);
/*
 * A read-only view of the disk as it was at snapshot `index`: its own L1,
 * the snapshot's disk size, the parent's backing chain. Borrows from
 * parent: close the view (qcow2_close) before the parent.
 */
int qcow2_snapshot_open(qcow2_image *parent, uint32_t index,
                        qcow2_image **view);

/* --- Writing (read-write handles; QCOW2_E_READONLY otherwise) ----------- */
/* qemu-img's encrypt.* options. format NULL: not encrypted. "aes" is
 * legacy AES-CBC (weak: no key check, predictable IVs; only when asked
 * by name); "luks" a LUKS1 header inside the image. The strings NULL:
 * qemu-img's defaults (aes-256, xts, plain64, sha256, sha256). */
typedef struct qcow2_encrypt_opts {
    const char *format;
    const char *key;            /* passphrase, key_len bytes (required) */
    size_t key_len;
    const char *cipher_alg, *cipher_mode, *ivgen_alg, *ivgen_hash_alg,
               *hash_alg;
    uint64_t iter_time_ms;      /* PBKDF2 time per keyslot; 0: 1000 */
} qcow2_encrypt_opts;

/* What qemu-img info shows of an image's encryption, without the key. */
typedef struct qcow2_encrypt_info {
    uint32_t method;            /* QCOW2_CRYPT_AES or QCOW2_CRYPT_LUKS */
    /* LUKS only: */
    char cipher_alg[16], cipher_mode[8], ivgen_alg[8], ivgen_hash_alg[16];
    char hash_alg[33], uuid[41];
    uint64_t payload_offset;    /* bytes */
    uint32_t master_key_iters;
    struct {
        int active;
        uint32_t iters, stripes;
        uint64_t key_offset;    /* bytes from the region's start */
    } slots[8];
} qcow2_encrypt_info;

/* 0 with *out filled for an encrypted image, else QCOW2_E_INVALID. */
int qcow2_get_encrypt_info(const qcow2_image *img, qcow2_encrypt_info *out);

typedef struct qcow2_create_opts {
    uint64_t size;              /* bytes, required */
    uint32_t version;           /* 2 or 3 (default 3) */
    uint64_t cluster_size;      /* default 65536 */
    uint32_t refcount_bits;     /* default 16 */
    int lazy_refcounts;
    const char *preallocation;  /* NULL/"off", "metadata", "falloc", "full" */
    const char *backing_file;
    const char *backing_format;
    int extended_l2;
    const char *compression_type; /* NULL/"zlib", "zstd" */
    const char *data_file;
    int data_file_raw;
    int overwrite;              /* replace an existing file */
    qcow2_encrypt_opts encrypt;
} qcow2_create_opts;

void qcow2_create_opts_init(qcow2_create_opts *opts);
/* Create an image and return it open read-write (open_opts may be NULL). */
int qcow2_create(const char *path, const qcow2_create_opts *opts,
                 const qcow2_open_opts *open_opts, qcow2_image **out,
                 qcow2_error *err);

int qcow2_write(qcow2_image *img, uint64_t offset, const void *buf,
                size_t length);
int qcow2_write_zeroes(qcow2_image *img, uint64_t offset, uint64_t length,
                       int unmap);
int qcow2_discard(qcow2_image *img, uint64_t offset, uint64_t length);
/* One whole cluster at a cluster-aligned offset (the disk's last, partial
 * cluster is zero padded). */
int qcow2_write_compressed(qcow2_image *img, uint64_t offset,
                           const void *buf, size_t length);
/* Metadata caches written back (refcount blocks, then L2 tables), then
 * the files synced. */
int qcow2_flush(qcow2_image *img);

/* img:stats(): one metadata cache's counters. */
typedef struct qcow2_cache_stats {
    uint64_t hits, misses;      /* lookups */
    uint64_t evictions;         /* tables pushed out to make room */
    uint64_t writebacks;        /* dirty tables written whole */
    uint32_t dirty;             /* tables newer than the disk now */
    uint32_t cached;            /* tables held now */
    uint32_t slots;             /* the bound */
} qcow2_cache_stats;

typedef struct qcow2_stats {
    qcow2_cache_stats l2, refcount;
    uint64_t flushes;           /* write-backs of the dirty caches */
    uint64_t syncs;             /* fsyncs of the image (and data file) */
    uint64_t reads, bytes_read;         /* image-file preads */
    uint64_t writes, bytes_written;     /* image-file pwrites */
} qcow2_stats;
/* The handle's counters since open (a read-only handle: reads only). */
int qcow2_stats_get(qcow2_image *img, qcow2_stats *out);
int qcow2_resize(qcow2_image *img, uint64_t size);

/* The image file itself, bypassing the format (tests, forensics). */
int qcow2_raw_read(qcow2_image *img, uint64_t offset, void *buf,
                   size_t length, size_t *done);
int qcow2_raw_write(qcow2_image *img, uint64_t offset, const void *buf,
                    size_t length);

/* Writes, truncates (offset: the new size) and flushes recorded with the
 * trace_writes option, in order. */
typedef struct qcow2_io_record {
    uint64_t offset;
    uint64_t length;
    const char *what;           /* "header", "l1", "l2", "refcount_table",
                                   "refcount_block", "data", ...,
                                   "truncate", "flush" */
} qcow2_io_record;
size_t qcow2_io_log_count(const qcow2_image *img);
int qcow2_io_log_at(const qcow2_image *img, size_t index,
                    qcow2_io_record *out);

/* --- Check ------------------------------------------------------------------ */
/*
 * qemu-img check: every host cluster's references are counted from the
 * image's own structures (header, L1/L2 tables of the active disk and of
 * every snapshot, snapshot table, refcount table and blocks, LUKS header,
 * bitmaps) and compared with the refcounts on disk; COPIED flags, reserved
 * bits and alignment are checked on the way. Counts follow qemu-img 7.2.
 */
enum qcow2_finding_kind {
    QCOW2_FINDING_CORRUPTION = 0,   /* counted in corruptions */
    QCOW2_FINDING_LEAK = 1,         /* counted in leaks */
    QCOW2_FINDING_CHECK_ERROR = 2,  /* counted in check_errors */
    QCOW2_FINDING_REPAIRED = 3,     /* fixed: corruptions_fixed/leaks_fixed */
    QCOW2_FINDING_STRICT = 4,       /* stricter than qemu-img: counted
                                       nowhere, the message says so */
};

typedef struct qcow2_finding {
    int kind;                   /* enum qcow2_finding_kind */
    uint64_t offset;            /* host offset the finding is about */
    uint64_t cluster;           /* offset >> cluster_bits */
    char *message;              /* qemu-img's stderr line where it has one */
} qcow2_finding;

enum qcow2_repair_mode {
    QCOW2_REPAIR_NONE = 0,
    QCOW2_REPAIR_LEAKS = 1,     /* qemu-img check -r leaks */
    QCOW2_REPAIR_ALL = 2,       /* -r all: corruptions too */
};

typedef struct qcow2_check_result {
    uint64_t corruptions;
    uint64_t leaks;
    uint64_t check_errors;
    uint64_t corruptions_fixed;
    uint64_t leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters;
    uint64_t allocated_clusters;
    uint64_t fragmented_clusters;
    uint64_t compressed_clusters;
    qcow2_finding *findings;    /* in the order qemu-img prints them */
    size_t finding_count;
    uint64_t findings_dropped;  /* beyond the recorded maximum */
} qcow2_check_result;

/*
 * Check img (read-only handles too: nothing is written unless repair is
 * asked for, which needs a read-write handle). Returns 0 when the check
 * ran, whatever it found, with *out filled (free it with
 * qcow2_check_result_free); a negative status when it could not run
 * (raw image or snapshot view, out of memory, repair refused).
 */
int qcow2_check(qcow2_image *img, int repair, qcow2_check_result *out);
void qcow2_check_result_free(qcow2_check_result *res);

/* --- Forensics: who owns each byte of the file, and what no view reads ---- */
/*
 * Every byte of the image file attributed to one owner, in file order,
 * without gaps or overlaps. Read-only (a read-write handle is flushed
 * first, so that the file says what the handle knows); a corrupt image is
 * walked as far as it can be followed, and what cannot be followed is
 * named in `problems` of the range holding the entry that points at it.
 * Memory is bounded by the file (claims per referenced range), never by
 * the virtual size. Not on snapshot views (same file: ask their image);
 * a raw image is one "data" range.
 */
enum qcow2_owner_kind {
    QCOW2_OWNER_HEADER = 0,
    QCOW2_OWNER_HEADER_EXTENSION,
    QCOW2_OWNER_BACKING_NAME,
    QCOW2_OWNER_L1,
    QCOW2_OWNER_L2,
    QCOW2_OWNER_REFCOUNT_TABLE,
    QCOW2_OWNER_REFCOUNT_BLOCK,
    QCOW2_OWNER_SNAPSHOT_TABLE,
    QCOW2_OWNER_SNAPSHOT_L1,
    QCOW2_OWNER_SNAPSHOT_L2,
    QCOW2_OWNER_BITMAP_DIRECTORY,
    QCOW2_OWNER_BITMAP_TABLE,
    QCOW2_OWNER_BITMAP_DATA,
    QCOW2_OWNER_CRYPTO_HEADER,
    QCOW2_OWNER_DATA,
    QCOW2_OWNER_COMPRESSED,
    QCOW2_OWNER_LEAKED,         /* refcount above 0, no reference */
    QCOW2_OWNER_FREE,           /* refcount 0 */
    QCOW2_OWNER_UNACCOUNTED,    /* no refcount block covers it */
    QCOW2_OWNER_OVERLAP,        /* claimed twice, incompatibly */
    QCOW2_OWNER_KINDS
};
/* The API's name of an owner kind ("header", "l2", ...). */
const char *qcow2_owner_name(int kind);

/* The unused rest of a cluster its owner holds only in part (cluster 0
 * after the header; after the last compressed stream; after a table). */
#define QCOW2_OWNER_SLACK   1u
/* data: a host cluster referenced by zero-flagged (or, with extended L2,
 * unallocated) entries only: no view reads these bytes. */
#define QCOW2_OWNER_SHADOW  2u

typedef struct qcow2_owner_range {
    uint64_t offset;            /* host offset in the image file */
    uint64_t length;
    int owner;                  /* enum qcow2_owner_kind */
    unsigned flags;             /* QCOW2_OWNER_* */
    int has_guest;              /* data, compressed: guest_offset is set */
    uint64_t guest_offset;      /* guest offset of `offset` (compressed:
                                   of the cluster the stream holds) */
    uint64_t refcount;          /* leaked: the refcount on disk */
    char *detail;               /* one line, or NULL */
    char *views;                /* names of the views reading it, one per
                                   line ("active", snapshot names), or NULL */
    char *problems;             /* what could not be followed, one per
                                   line, or NULL */
} qcow2_owner_range;

int qcow2_owners(qcow2_image *img, qcow2_owner_range **out, size_t *count);
void qcow2_owners_free(qcow2_owner_range *ranges, size_t count);

/* Bytes of the file no view reads, non-zero ranges only (zero runs of a
 * sector or more split a range; edges trimmed to the byte). Built on
 * qcow2_owners. */
enum qcow2_residue_kind {
    QCOW2_RESIDUE_LEAKED = 0,
    QCOW2_RESIDUE_FREE,
    QCOW2_RESIDUE_COMPRESSED_SLACK,
    QCOW2_RESIDUE_HEADER_SLACK,
    QCOW2_RESIDUE_ZERO_SHADOW,
    QCOW2_RESIDUE_TAIL,
};
const char *qcow2_residue_name(int kind);

typedef struct qcow2_residue_range {
    uint64_t offset;
    uint64_t length;
    int kind;                   /* enum qcow2_residue_kind */
    double entropy;             /* Shannon, bits per byte */
} qcow2_residue_range;

int qcow2_residue(qcow2_image *img, qcow2_residue_range **out,
                  size_t *count);
void qcow2_residue_free(qcow2_residue_range *ranges);

/* --- Snapshots (writing) ---------------------------------------------------- */
/* What qcow2_snapshot_create records besides the disk. */
typedef struct qcow2_snapshot_create_opts {
    const void *vm_state;       /* written to the VM-state area first */
    size_t vm_state_size;
    uint64_t vm_clock_nsec;
    int has_date;               /* 0: now */
    uint32_t date_sec;
    uint32_t date_nsec;
    int64_t icount;             /* qemu-img writes 0; -1 = none */
} qcow2_snapshot_create_opts;

void qcow2_snapshot_create_opts_init(qcow2_snapshot_create_opts *opts);
/*
 * QEMU's qcow2_snapshot_create: id max(numeric ids)+1, the active disk
 * (and opts->vm_state) kept; the VM state is then dropped from the active
 * disk. QCOW2_E_EXISTS when the name matches an existing name or id;
 * QCOW2_E_UNSUPPORTED with 1-bit refcounts or an external data file.
 * *index (may be NULL) gets the new entry's index.
 */
int qcow2_snapshot_create(qcow2_image *img, const char *name,
                          const qcow2_snapshot_create_opts *opts,
                          uint32_t *index);
/* QEMU's qcow2_snapshot_goto: the active disk (and virtual size) become
 * snapshot `index`'s. */
int qcow2_snapshot_apply(qcow2_image *img, uint32_t index);
/* QEMU's qcow2_snapshot_delete: indexes of later entries shift down. */
int qcow2_snapshot_delete(qcow2_image *img, uint32_t index);
/* The active VM-state area (guest offset past the disk, QEMU's
 * qcow2_vm_state_offset) at pos; the L1 table grows as writes need. */
int qcow2_vmstate_save(qcow2_image *img, uint64_t pos, const void *buf,
                       size_t length);
int qcow2_vmstate_load(qcow2_image *img, uint64_t pos, void *buf,
                       size_t length);
/* Bytes of the VM-state area up to the end of its last allocated cluster
 * (0 when none is): past it there is no VM state to read. */
int qcow2_vmstate_size(qcow2_image *img, uint64_t *size);

/* --- Amend and make_empty (read-write handles) --------------------------- */
/*
 * qemu-img amend: only what is set changes. version 0 keeps the version
 * (2 or 3 otherwise; down to 2 expands zero clusters and refuses what
 * version 2 cannot hold); lazy_refcounts -1 keeps the setting;
 * backing_file / backing_format NULL keep them ("" removes); size 0 keeps
 * the size. Refusals change nothing.
 */
typedef struct qcow2_amend_opts {
    uint32_t version;
    int lazy_refcounts;
    const char *backing_file;
    const char *backing_format;
    uint64_t size;
} qcow2_amend_opts;

void qcow2_amend_opts_init(qcow2_amend_opts *opts);
int qcow2_amend(qcow2_image *img, const qcow2_amend_opts *opts);
/* Drop all active data (QEMU's bdrv_make_empty): a fresh metadata layout
 * and a truncated file for version 3 images without snapshots, a discard
 * of every cluster otherwise. */
int qcow2_make_empty(qcow2_image *img);

/* --- Rebase and commit (read-write handles) -------------------------------- */
/*
 * qemu-img rebase. backing_file NULL or "" removes the backing file;
 * otherwise it is stored as given and opened next to the image (plain
 * names only, as backing files are followed). backing_format NULL: the
 * file's probed format is stored (safe), or none (unsafe); else "qcow2"
 * or "raw" (unsafe: any name, stored as given).
 * Safe (unsafe 0): needs the old chain open; every sector this image does
 * not allocate itself and whose old-chain bytes differ from the new
 * chain's gets the old bytes written into this image (ordinary guest
 * writes: a crash leaves the old backing, under which they read the
 * same), the image flushed, then the backing name and format switched by
 * one synced header write. Unsafe: the switch only.
 * Afterwards the handle's chain is the new one (the old backing handle
 * and everything borrowed from it are closed); an unsafe rebase to a
 * file that cannot be opened leaves the chain closed.
 */
int qcow2_rebase(qcow2_image *img, const char *backing_file,
                 const char *backing_format, int unsafe);
/*
 * qemu-img commit: the clusters this image allocates itself (data,
 * compressed and zero clusters; never the backing chain's) written into
 * its backing file (qcow2 or raw; grown first if smaller than this
 * image), which is reopened read-write with the writer's locks for it
 * (QCOW2_E_BUSY if another holds it) and flushed; then this image is
 * emptied (qcow2_make_empty). A crash before the empty leaves the data in
 * both files, during it a partly emptied image over a backing file that
 * holds the data: the guest bytes never change. A fault plan of img's
 * open (the `io` option) covers the backing file too, with one write
 * count: a power cut stops both files at the same write. The backing
 * file is read-only in img's chain again afterwards.
 */
int qcow2_commit(qcow2_image *img);

/* --- Persistent bitmaps (read side) ---------------------------------------- */
#define QCOW2_BITMAP_IN_USE     (1u << 0)
#define QCOW2_BITMAP_AUTO       (1u << 1)

typedef struct qcow2_bitmap_info {
    char *name;
    uint32_t flags;             /* QCOW2_BITMAP_* bits as stored */
    uint8_t type;               /* 1 = dirty tracking */
    uint8_t granularity_bits;
    uint64_t granularity;       /* bytes covered by one bit */
    uint64_t table_offset;
    uint32_t table_size;
} qcow2_bitmap_info;

/* The bitmap directory in table order (empty unless the image's bitmaps
 * extension is trusted). Free with qcow2_bitmap_list_free. */
int qcow2_bitmap_list(qcow2_image *img, qcow2_bitmap_info **out,
                      size_t *count);
void qcow2_bitmap_list_free(qcow2_bitmap_info *list, size_t count);

/*
 * The dirty ranges of the bitmap named `name`, streamed. Open validates
 * the directory entry (type, flags, table size against the disk, table
 * inside the file) and every table entry (reserved bits, data clusters
 * aligned and inside the file), reading the table a chunk at a time;
 * an in-use bitmap (not stored cleanly) is refused as unsupported.
 * Next gives one merged range of dirty guest bytes: 1 with *start and
 * *length set, 0 at the end, or a negative status. Memory: the iterator
 * holds one table chunk and one data cluster, whatever the image claims.
 * The iterator borrows nothing: pass the same image to every call.
 */
typedef struct qcow2_bitmap_iter qcow2_bitmap_iter;
int qcow2_bitmap_extents_open(qcow2_image *img, const char *name,
                              qcow2_bitmap_iter **out);
int qcow2_bitmap_extents_next(qcow2_image *img, qcow2_bitmap_iter *it,
                              uint64_t *start, uint64_t *length);
void qcow2_bitmap_extents_free(qcow2_bitmap_iter *it);

#endif /* QCOW2_H */
