/*
 * img:residue(): the bytes of the file that no view reads, found from
 * qcow2_owners: leaked and free clusters, the slack after compressed
 * streams and in cluster 0, data behind zero-flagged entries, and the
 * tail past the last cluster in use. Only non-zero bytes count: a run of
 * zeroes of a sector or more splits a range, and each range starts and
 * ends on a non-zero byte, so planted bytes come out at their offsets.
 * Slack of other tables (the rest of an L1's cluster) is not a kind of
 * the contract: it is reported only past the last byte in use, as tail.
 */
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>

#include "owners.h"

/* Zero bytes that split a range. */
#define RESIDUE_GAP     512u
#define RESIDUE_CHUNK   ((size_t)64 << 10)

static const char *const residue_names[] = {
    "leaked", "free", "compressed_slack", "header_slack", "zero_shadow",
    "tail",
};

const char *qcow2_residue_name(int kind)
{
    return kind >= 0 && kind <= QCOW2_RESIDUE_TAIL ? residue_names[kind]
                                                   : NULL;
}

void qcow2_residue_free(qcow2_residue_range *ranges)
{
    free(ranges);
}

typedef struct scan {
    qcow2_image *img;
    uint8_t *chunk;
    qcow2_residue_range *out;
    size_t n, cap;
    /* the open span: [start, end) with end just past its last non-zero
     * byte; hist counts its bytes */
    int open;
    uint64_t start, end;
    uint64_t hist[256];
} scan;

/* log2 of x > 0 without libm (the module links none): the binary
 * exponent by halving, the mantissa in [1, 2) by ln m = 2 atanh(t),
 * t = (m - 1) / (m + 1) <= 1/3, whose series converges fast. */
static double log2_of(double x)
{
    double exponent = 0, t, t2, term, sum = 0;

    while (x >= 2) {
        x /= 2;
        exponent++;
    }
    while (x < 1) {
        x *= 2;
        exponent--;
    }
    t = (x - 1) / (x + 1);
    t2 = t * t;
    term = t;
    for (int k = 1; k < 60; k += 2) {
        sum += term / k;
        term *= t2;
    }
    return exponent + 2 * sum / 0.69314718055994530942;
}

static int close_span(scan *s, int kind)
{
    uint64_t total = s->end - s->start;
    double entropy = 0;

    if (!s->open)
        return 0;
    s->open = 0;
    for (int v = 0; v < 256; v++) {
        if (s->hist[v]) {
            double p = (double)s->hist[v] / (double)total;
            entropy -= p * log2_of(p);
        }
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 32;
        qcow2_residue_range *grown = realloc(s->out, cap * sizeof *grown);
        if (!grown)
            return QCOW2_E_NOMEM;
        s->out = grown;
        s->cap = cap;
    }
    s->out[s->n++] = (qcow2_residue_range){ s->start, total, kind,
                                            entropy > 0 ? entropy : 0 };
    return 0;
}

/* The non-zero spans of file bytes [offset, offset + length). */
static int scan_range(scan *s, uint64_t offset, uint64_t length, int kind)
{
    uint64_t pos = offset, end = offset + length;
    int ret;

    while (pos < end) {
        size_t len = (size_t)min_u64(end - pos, RESIDUE_CHUNK), done;
        if ((ret = qcow2_pread_zero_fill(s->img->io, pos, s->chunk, len,
                                         &done)) < 0)
            return qcow2_fail(s->img, ret, "cannot read the file at 0x%llx",
                              (unsigned long long)pos);
        for (size_t i = 0; i < done; i++) {
            uint64_t at = pos + i;
            uint8_t v = s->chunk[i];
            if (v == 0) {
                if (s->open && at + 1 - s->end >= RESIDUE_GAP &&
                    (ret = close_span(s, kind)) < 0)
                    return ret;
                continue;
            }
            if (!s->open) {
                memset(s->hist, 0, sizeof s->hist);
                s->open = 1;
                s->start = at;
            } else {
                s->hist[0] += at - s->end;
            }
            s->hist[v]++;
            s->end = at + 1;
        }
        if (done < len)
            break;          /* the file ended */
        pos += len;
    }
    return close_span(s, kind);
}

/* Bytes of the compressed stream at the start of buf (len bytes), or len
 * when its end cannot be told. */
static size_t stream_length(qcow2_image *img, const uint8_t *buf, size_t len,
                            uint8_t *out)
{
    if (img->compression_type == COMPRESSION_ZSTD) {
        size_t n = ZSTD_findFrameCompressedSize(buf, len);
        return ZSTD_isError(n) || n > len ? len : n;
    } else {
        z_stream z;
        size_t used = len;
        memset(&z, 0, sizeof z);
        if (inflateInit2(&z, -12) != Z_OK)
            return len;
        z.next_in = (Bytef *)(uintptr_t)buf;
        z.avail_in = (uInt)len;
        z.next_out = out;
        z.avail_out = (uInt)img->cluster_size;
        if (inflate(&z, Z_FINISH) == Z_STREAM_END)
            used = len - z.avail_in;
        inflateEnd(&z);
        return used;
    }
}

/* The slack after the stream of one compressed range. */
static int scan_stream(scan *s, const qcow2_owner_range *r, uint8_t *buf,
                       uint8_t *out)
{
    size_t len = (size_t)r->length, done, used;
    int ret;

    if (r->length > 2 * s->img->cluster_size + 512)
        return 0;           /* cannot be one stream: nothing to cut */
    if ((ret = qcow2_pread_zero_fill(s->img->io, r->offset, buf, len,
                                     &done)) < 0)
        return qcow2_fail(s->img, ret, "cannot read the compressed stream "
                          "at 0x%llx", (unsigned long long)r->offset);
    used = stream_length(s->img, buf, done, out);
    if (used >= done)
        return 0;
    return scan_range(s, r->offset + used, done - used,
                      QCOW2_RESIDUE_COMPRESSED_SLACK);
}

/* The kind of residue a whole range is, or -1 (compressed streams and
 * free space are cut further by the caller). */
static int range_kind(const qcow2_owner_range *r)
{
    int slack = (r->flags & QCOW2_OWNER_SLACK) != 0;

    switch (r->owner) {
    case QCOW2_OWNER_LEAKED:
        return QCOW2_RESIDUE_LEAKED;
    case QCOW2_OWNER_HEADER:
        return slack ? QCOW2_RESIDUE_HEADER_SLACK : -1;
    case QCOW2_OWNER_COMPRESSED:
        return slack ? QCOW2_RESIDUE_COMPRESSED_SLACK : -1;
    case QCOW2_OWNER_DATA:
        return r->flags & QCOW2_OWNER_SHADOW ? QCOW2_RESIDUE_ZERO_SHADOW : -1;
    default:
        return -1;
    }
}

static int scan_all(scan *s, const qcow2_owner_range *r, size_t n)
{
    uint64_t tail = 0;
    uint8_t *buf, *out;
    int ret = 0;

    /* the tail starts after the last byte a structure uses (QEMU may end
     * the file inside a cluster, after the 8 bytes of a new L1 table) */
    for (size_t i = 0; i < n; i++)
        if (r[i].owner != QCOW2_OWNER_FREE &&
            r[i].owner != QCOW2_OWNER_UNACCOUNTED &&
            !(r[i].flags & QCOW2_OWNER_SLACK))
            tail = r[i].offset + r[i].length;
    buf = malloc((size_t)(2 * s->img->cluster_size + 512));
    out = malloc((size_t)s->img->cluster_size);
    if (!buf || !out) {
        free(buf);
        free(out);
        return QCOW2_E_NOMEM;
    }
    for (size_t i = 0; ret == 0 && i < n; i++) {
        uint64_t start = r[i].offset, end = r[i].offset + r[i].length;
        int kind = range_kind(&r[i]);

        if (kind >= 0) {
            ret = scan_range(s, start, r[i].length, kind);
        } else if (r[i].owner == QCOW2_OWNER_COMPRESSED) {
            ret = scan_stream(s, &r[i], buf, out);
        } else if (r[i].owner == QCOW2_OWNER_FREE ||
                   r[i].owner == QCOW2_OWNER_UNACCOUNTED ||
                   (r[i].flags & QCOW2_OWNER_SLACK)) {
            /* a table's slack counts only past the tail */
            uint64_t cut = min_u64(max_u64(tail, start), end);
            if (!(r[i].flags & QCOW2_OWNER_SLACK))
                ret = scan_range(s, start, cut - start, QCOW2_RESIDUE_FREE);
            if (ret == 0)
                ret = scan_range(s, cut, end - cut, QCOW2_RESIDUE_TAIL);
        }
    }
    free(buf);
    free(out);
    return ret;
}

static int residue_work(qcow2_image *img, qcow2_residue_range **out,
                        size_t *count)
{
    qcow2_owner_range *ranges;
    size_t n;
    scan s;
    int ret;

    *out = NULL;
    *count = 0;
    if ((ret = qcow2_owners(img, &ranges, &n)) < 0)
        return ret;
    if (img->is_raw) {
        qcow2_owners_free(ranges, n);
        return 0;           /* a raw file is all guest data */
    }
    memset(&s, 0, sizeof s);
    s.img = img;
    s.chunk = malloc(RESIDUE_CHUNK);
    ret = s.chunk ? scan_all(&s, ranges, n) : QCOW2_E_NOMEM;
    free(s.chunk);
    qcow2_owners_free(ranges, n);
    if (ret < 0) {
        free(s.out);
        return ret == QCOW2_E_NOMEM
                   ? qcow2_fail(img, ret, "out of memory for residue") : ret;
    }
    *out = s.out;
    *count = s.n;
    return 0;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_residue(qcow2_image *img, qcow2_residue_range **out,
                  size_t *count)
{
    int rc = qcow2_meta_flush(img);

    return rc < 0 ? rc : residue_work(img, out, count);
}
