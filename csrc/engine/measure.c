/*
 * qemu-img measure (an operation, layer 8): the file size a new qcow2
 * image of given options needs, fully allocated and for the data of an
 * existing image (or view), as QEMU 7.2's qcow2_measure computes it.
 */
#include <inttypes.h>
#include <string.h>

#include "ops.h"

#define REFTABLE_ENTRY   8u
#define L1_ENTRY         8u
#define BITMAP_DIR_ENTRY 24u    /* fixed part of a bitmap directory entry */
#define BITMAP_TABLE_ENTRY 8u

static uint64_t div_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

/* QEMU's qcow2_refcount_metadata_size: the fixed point where the refcount
 * blocks and table count every cluster, themselves included. */
static uint64_t refcount_metadata_size(uint64_t clusters, uint64_t cs,
                                       uint32_t refcount_order)
{
    uint64_t per_table_cluster = cs / REFTABLE_ENTRY;
    uint64_t per_block = cs * 8 / ((uint64_t)1 << refcount_order);
    uint64_t table = 0, blocks = 0, n = 0, last;

    do {
        last = n;
        blocks = div_up(clusters + table + blocks, per_block);
        table = div_up(blocks, per_table_cluster);
        n = clusters + blocks + table;
    } while (n != last);
    return (blocks + table) * cs;
}

/* QEMU's qcow2_calc_prealloc_size: header, L2 and L1 tables covering the
 * disk, refcount metadata for all of it, and the data. */
static uint64_t prealloc_size(uint64_t total, uint64_t cs,
                              uint32_t refcount_order, int extended_l2)
{
    uint64_t l2e = extended_l2 ? 16 : 8;
    uint64_t aligned = align_up(total, cs), meta = cs, nl2e, nl1e;

    nl2e = align_up(aligned / cs, cs / l2e);
    meta += nl2e * l2e;
    nl1e = align_up(nl2e * l2e / cs, cs / L1_ENTRY);
    meta += nl1e * L1_ENTRY;
    meta += refcount_metadata_size((meta + aligned) / cs, cs,
                                   refcount_order);
    return meta + aligned;
}

/* ---- Options: the checks qcow2_measure makes, with QEMU's words --------- */

static int check_opts(const qcow2_create_opts *o, uint32_t *cluster_bits,
                      uint32_t *refcount_order, int *full,
                      qcow2_error *err)
{
    uint64_t cs = o->cluster_size, l2_tables;
    const char *pre = o->preallocation;

    if (cs < 512 || cs > ((uint64_t)2 << 20) || (cs & (cs - 1)))
        return qcow2_error_set(err, QCOW2_E_INVALID, "Cluster size must be "
                               "a power of two between 512 and 2048k");
    *cluster_bits = (uint32_t)__builtin_ctzll(cs);
    if (o->version != 2 && o->version != 3)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Parameter 'version' "
                               "does not accept value '%u'", o->version);
    if (o->refcount_bits == 0 || o->refcount_bits > 64 ||
        (o->refcount_bits & (o->refcount_bits - 1)))
        return qcow2_error_set(err, QCOW2_E_INVALID, "Refcount width must be "
                               "a power of two and may not exceed 64 bits");
    if (o->version < 3 && o->refcount_bits != 16)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Different refcount "
                               "widths than 16 bits require compatibility "
                               "level 1.1 or above (use version=v3 or "
                               "greater)");
    *refcount_order = (uint32_t)__builtin_ctz(o->refcount_bits);
    if (pre && strcmp(pre, "off") && strcmp(pre, "metadata") &&
        strcmp(pre, "falloc") && strcmp(pre, "full"))
        return qcow2_error_set(err, QCOW2_E_INVALID, "Parameter "
                               "'preallocation' does not accept value '%s'",
                               pre);
    *full = pre && (!strcmp(pre, "falloc") || !strcmp(pre, "full"));
    if (o->size > (uint64_t)INT64_MAX - cs)
        return qcow2_error_set(err, QCOW2_E_INVALID, "Image size must be "
                               "less than 8 EiB!");
    l2_tables = div_up(align_up(o->size, cs) / cs,
                       cs / (o->extended_l2 ? 16 : 8));
    if (l2_tables > QCOW2_MAX_L1_BYTES / L1_ENTRY)
        return qcow2_error_set(err, QCOW2_E_INVALID, "The image size is too "
                               "large (try using a larger cluster size)");
    return 0;
}

/* ---- The input image ----------------------------------------------------- */

typedef struct count_state {
    uint64_t cs;
    uint64_t next;              /* where QEMU's walk asks next */
    uint64_t required;
    const char *bad;            /* a corrupt extent's reason */
} count_state;

/* QEMU walks block status from offset to offset; a data extent counts
 * from its start (plus its offset inside the cluster, a quirk kept) to
 * the end of its last cluster, and the walk resumes there. */
static int count_extent(void *ctx, const qcow2_extent *e)
{
    count_state *st = ctx;
    uint64_t end = e->start + e->length, at;

    if (e->type == QCOW2_EXTENT_CORRUPT) {
        st->bad = e->reason;
        return 1;
    }
    if (end <= st->next)
        return 0;
    at = st->next > e->start ? st->next : e->start;
    if (e->type == QCOW2_EXTENT_DATA && e->reads_zero)
        return 0;
    if (e->type != QCOW2_EXTENT_DATA && e->type != QCOW2_EXTENT_COMPRESSED)
        return 0;
    /* One block-status answer covers the rest of this extent. */
    st->next = align_up(end, st->cs);
    st->required += at % st->cs + (st->next - at);
    return 0;
}

static int measure_input(qcow2_image *from, uint64_t cs, uint64_t length,
                         uint64_t *required, qcow2_error *err)
{
    count_state st = { cs, 0, 0, NULL };
    int rc = qcow2_map(from, 0, length, count_extent, &st);

    if (st.bad)
        return qcow2_error_set(err, QCOW2_E_CORRUPT, "%s", st.bad);
    if (rc < 0)
        return qcow2_error_set(err, rc, "%s", qcow2_errmsg(from));
    *required = st.required;
    return 0;
}

/* QEMU's qcow2_measure_bitmaps: each persistent bitmap of the input as if
 * wholly dirty (data clusters and table), plus the directory. */
static int measure_bitmaps(qcow2_image *img, uint64_t disk, uint64_t cs,
                           uint64_t *out, qcow2_error *err)
{
    qcow2_bitmap_info *list = NULL;
    size_t count = 0;
    uint64_t total = 0, dir = 0;
    int rc = qcow2_bitmap_list(img, &list, &count);

    if (rc < 0)
        return qcow2_error_set(err, rc, "%s", qcow2_errmsg(img));
    for (size_t i = 0; i < count; i++) {
        uint64_t bits = div_up(disk, list[i].granularity);
        uint64_t clusters = div_up(div_up(bits, 8), cs);

        total += clusters * cs;
        total += align_up(clusters * BITMAP_TABLE_ENTRY, cs);
        dir += align_up(BITMAP_DIR_ENTRY + strlen(list[i].name), 8);
    }
    qcow2_bitmap_list_free(list, count);
    *out = total + align_up(dir, cs);
    return 0;
}

static int measure_work(const struct qcow2_create_opts *o, qcow2_image *from,
                        qcow2_image *bitmaps_of, qcow2_measure_result *out,
                        qcow2_error *err)
{
    uint32_t cluster_bits = 0, refcount_order = 0;
    uint64_t cs = o->cluster_size, virtual_size, required = 0;
    int full = 0, rc;

    memset(out, 0, sizeof *out);
    rc = check_opts(o, &cluster_bits, &refcount_order, &full, err);
    if (rc < 0)
        return rc;
    virtual_size = align_up(o->size, cs);
    if (!bitmaps_of)
        bitmaps_of = from;
    if (from) {
        uint64_t length = from->is_raw ? align_up(from->size, 512)
                                       : from->size;
        /* qemu-img measure -l keeps the image's current virtual size
         * (bdrv_snapshot_load_tmp does not change it). */
        virtual_size = align_up(bitmaps_of->is_raw
                                ? align_up(bitmaps_of->size, 512)
                                : bitmaps_of->size, cs);
        if (o->backing_file) {
            /* The new backing file may share nothing with the input. */
            required = virtual_size;
        } else {
            rc = measure_input(from, cs, length, &required, err);
            if (rc < 0)
                return rc;
        }
    }
    if (full)
        required = virtual_size;
    out->fully_allocated = prealloc_size(virtual_size, cs, refcount_order,
                                         o->extended_l2);
    out->required = out->fully_allocated - virtual_size + required;
    /* Shown when both sides could hold bitmaps: a v3 output, a v3 qcow2
     * input. */
    out->has_bitmaps = o->version >= 3 && bitmaps_of &&
                       !bitmaps_of->is_raw && bitmaps_of->hdr.version >= 3;
    if (out->has_bitmaps) {
        rc = measure_bitmaps(bitmaps_of, bitmaps_of->size, cs,
                             &out->bitmaps, err);
        if (rc < 0)
            return rc;
    }
    return 0;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_measure(const struct qcow2_create_opts *o, qcow2_image *from,
                  qcow2_image *bitmaps_of, qcow2_measure_result *out,
                  qcow2_error *err)
{
    int rc = qcow2_meta_flush(from);

    return rc < 0 ? rc : measure_work(o, from, bitmaps_of, out, err);
}
