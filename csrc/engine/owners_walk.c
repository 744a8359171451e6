/*
 * img:owners(), the walk: every structure of the file that claims host
 * bytes (header, extensions, backing name, the active and every snapshot
 * L1/L2 tree, snapshot table, refcount table and blocks, LUKS header,
 * bitmaps) lists its claims. Read-only, straight from the file (no cache
 * is filled); a claim that cannot be followed (unaligned, past the end of
 * the file, reserved bits) becomes a problem named at the entry that
 * makes it, never a failure. check_walk.c walks the same structures but
 * only counts references per cluster; owners need guest offsets, views
 * and byte ranges, hence a walker of their own.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "owners.h"
#include "snapshot_table.h"

#define L2_BITMAP_ALL_ALLOC     0x00000000ffffffffull
#define BME_RESERVED_MASK       0xff000000000001feull
#define BME_OFFSET_MASK         0x00fffffffffffe00ull
#define BME_FLAG_ALL_ONES       1ull
#define BITMAP_ENTRY_FIXED      24u
/* Header fields whose offset names a problem with what they point at. */
#define HDR_AT_BACKING          8u
#define HDR_AT_L1               40u
#define HDR_AT_REFTABLE         48u
#define HDR_AT_SNAPSHOTS        64u

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

/* ---- Problems ---------------------------------------------------------------- */

void owners_problem(own_walk *w, uint64_t at, const char *fmt, ...)
{
    char text[QCOW2_ERRMSG_MAX];
    va_list ap;

    if (w->n_problems >= OWN_MAX_PROBLEMS) {
        w->problems_dropped++;
        return;
    }
    if (w->n_problems == w->cap_problems) {
        size_t cap = w->cap_problems ? w->cap_problems * 2 : 16;
        own_problem *grown = realloc(w->problems, cap * sizeof *grown);
        if (!grown) {
            w->problems_dropped++;
            return;
        }
        w->problems = grown;
        w->cap_problems = cap;
    }
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    w->problems[w->n_problems].text = strdup(text);
    if (!w->problems[w->n_problems].text) {
        w->problems_dropped++;
        return;
    }
    w->problems[w->n_problems++].at = at;
}

const char *owners_view_name(const qcow2_image *img, uint32_t view)
{
    if (view == 0 || view > img->nb_snapshots)
        return "active";
    return img->snapshots[view - 1].name;
}

/* ---- Claims --------------------------------------------------------------------- */

static int spend(own_walk *w)
{
    if (w->budget == 0) {
        if (!w->out_of_budget)
            owners_problem(w, 0, "more references than a file of %llu bytes "
                           "can hold sensibly: the walk stopped here",
                           ull(w->file_size));
        w->out_of_budget = 1;
        return 0;
    }
    w->budget--;
    return 1;
}

/* The run continues the last claim (same table, contiguous host and
 * guest bytes, same readers): extend it instead of adding one. */
static int continues(const own_claim *last, int kind, uint64_t offset,
                     uint64_t guest, uint32_t ref, int shadow)
{
    return last->kind == kind && last->ref == ref &&
           last->shadow == shadow &&
           (kind == QCOW2_OWNER_DATA || kind == QCOW2_OWNER_BITMAP_DATA) &&
           last->offset + last->length == offset &&
           last->guest + last->length == guest;
}

/*
 * Claim [offset, offset+length) for `what` (named in problems, made at
 * host offset `at`). Past the end of the file: a problem, no claim
 * (returns 1); a claim running less than a cluster past it is cut quietly
 * (the last cluster of a file may be short), more is cut with a problem.
 */
static int claim(own_walk *w, int kind, uint64_t offset, uint64_t length,
                 uint64_t guest, uint32_t ref, int shadow, uint64_t at,
                 const char *what)
{
    uint64_t end;
    own_claim *c;

    if (length == 0 || w->out_of_budget)
        return 0;
    if (offset >= w->file_size) {
        owners_problem(w, at, "%s at 0x%llx is past the end of the file "
                       "(%llu bytes): not followed", what, ull(offset),
                       ull(w->file_size));
        return 1;
    }
    if (add_overflows(offset, length, &end) || end > w->file_size) {
        if (add_overflows(offset, length, &end) ||
            end > align_up(w->file_size, w->img->cluster_size))
            owners_problem(w, at, "%s at 0x%llx (%llu bytes) runs past the "
                           "end of the file (%llu bytes)", what, ull(offset),
                           ull(length), ull(w->file_size));
        length = w->file_size - offset;
    }
    if (w->n_claims &&
        continues(&w->claims[w->n_claims - 1], kind, offset, guest, ref,
                  shadow)) {
        w->claims[w->n_claims - 1].length += length;
        return 0;
    }
    if (!spend(w))
        return 0;
    if (w->n_claims == w->cap_claims) {
        size_t cap = w->cap_claims ? w->cap_claims * 2 : 256;
        own_claim *grown = realloc(w->claims, cap * sizeof *grown);
        if (!grown)
            return QCOW2_E_NOMEM;
        w->claims = grown;
        w->cap_claims = cap;
    }
    c = &w->claims[w->n_claims++];
    c->offset = offset;
    c->length = length;
    c->guest = guest;
    c->ref = ref;
    c->kind = (uint8_t)kind;
    c->shadow = (uint8_t)(shadow != 0);
    return 0;
}

/* Up to len bytes of the file at offset, zeroes past its end. */
static int read_file(own_walk *w, uint64_t offset, void *buf, size_t len,
                     const char *what)
{
    char text[128];
    size_t done;
    int ret = qcow2_pread_zero_fill(w->img->io, offset, buf, len, &done);

    if (ret < 0)
        return qcow2_fail(w->img, QCOW2_E_IO, "cannot read the %s at 0x%llx: "
                          "%s", what, ull(offset),
                          qcow2_errno_text(w->img->io->last_errno, text,
                                           sizeof text));
    return 0;
}

/* ---- L2 tables, each walked once -------------------------------------------------- */

static uint64_t hash_slot(uint64_t key, size_t cap)
{
    key ^= key >> 29;
    key *= 0xbf58476d1ce4e5b9ull;
    key ^= key >> 32;
    return key & (cap - 1);
}

static int hash_grow(own_walk *w)
{
    size_t cap = w->hash_cap ? w->hash_cap * 2 : 1024;
    uint64_t *keys = calloc(cap, sizeof *keys);
    uint32_t *values = calloc(cap, sizeof *values);

    if (!keys || !values) {
        free(keys);
        free(values);
        return QCOW2_E_NOMEM;
    }
    for (size_t i = 0; i < w->hash_cap; i++) {
        uint64_t slot;
        if (!w->hash_values[i])
            continue;
        slot = hash_slot(w->hash_keys[i], cap);
        while (values[slot])
            slot = (slot + 1) & (cap - 1);
        keys[slot] = w->hash_keys[i];
        values[slot] = w->hash_values[i];
    }
    free(w->hash_keys);
    free(w->hash_values);
    w->hash_keys = keys;
    w->hash_values = values;
    w->hash_cap = cap;
    return 0;
}

/* The slot of l2_offset: its value is 0 when the table is new. */
static size_t hash_find(const own_walk *w, uint64_t l2_offset)
{
    size_t slot = hash_slot(l2_offset, w->hash_cap);

    while (w->hash_values[slot] && w->hash_keys[slot] != l2_offset)
        slot = (slot + 1) & (w->hash_cap - 1);
    return slot;
}

static int add_view(own_walk *w, own_source *src, uint32_t view)
{
    if (src->n_views && src->views[src->n_views - 1] == view)
        return 0;
    if (!spend(w))
        return 0;
    if (src->n_views == src->cap_views) {
        uint32_t cap = src->cap_views ? src->cap_views * 2 : 2;
        uint32_t *grown = realloc(src->views, cap * sizeof *grown);
        if (!grown)
            return QCOW2_E_NOMEM;
        src->views = grown;
        src->cap_views = cap;
    }
    src->views[src->n_views++] = view;
    return 0;
}

/* QEMU's qcow2_parse_compressed_l2_entry: stream offset, and the length
 * from it to the end of its last sector. */
static void parse_compressed(const qcow2_image *img, uint64_t entry,
                             uint64_t *coffset, uint64_t *csize)
{
    uint32_t csize_shift = 62 - (img->cluster_bits - 8);
    uint64_t csize_mask = (1ull << (img->cluster_bits - 8)) - 1;
    uint64_t sectors;

    *coffset = entry & ((1ull << csize_shift) - 1);
    sectors = ((entry >> csize_shift) & csize_mask) + 1;
    *csize = sectors * 512 - (*coffset & 511);
}

/* Extended L2: runs of subclusters that are read (allocated, not zero)
 * and that are not (the host bytes behind them are shadowed). */
static int claim_subclusters(own_walk *w, uint64_t offset, uint64_t guest,
                             uint32_t src, uint64_t bitmap, uint64_t at)
{
    uint64_t sc = w->img->subcluster_size;
    unsigned k = 0;
    int ret;

    while (k < 32) {
        int reads = ((bitmap >> k) & 1) && !((bitmap >> (32 + k)) & 1);
        unsigned j = k + 1;
        while (j < 32 && (((bitmap >> j) & 1) && !((bitmap >> (32 + j)) & 1))
                             == reads)
            j++;
        ret = claim(w, QCOW2_OWNER_DATA, offset + k * sc, (j - k) * sc,
                    guest + k * sc, src, !reads, at, "data cluster");
        if (ret != 0)
            return ret;
        k = j;
    }
    return 0;
}

static int walk_l2_entry(own_walk *w, uint32_t src, uint64_t guest,
                         uint64_t entry, uint64_t bitmap, uint64_t at)
{
    qcow2_image *img = w->img;
    int has_data_file = (img->hdr.incompatible_features & INCOMPAT_DATA_FILE)
                        != 0;
    uint64_t offset = entry & L2E_OFFSET_MASK;
    char what[96];

    if (entry & QCOW_OFLAG_COMPRESSED) {
        uint64_t coffset, csize;
        if (has_data_file) {
            owners_problem(w, at, "compressed L2 entry 0x%llx for guest "
                           "0x%llx in an image with a data file",
                           ull(entry), ull(guest));
            return 0;
        }
        parse_compressed(img, entry, &coffset, &csize);
        snprintf(what, sizeof what, "compressed cluster for guest 0x%llx",
                 ull(guest));
        return claim(w, QCOW2_OWNER_COMPRESSED, coffset, csize, guest, src,
                     0, at, what);
    }
    if (entry & L2E_RESERVED_MASK)
        owners_problem(w, at, "L2 entry 0x%llx for guest 0x%llx has reserved "
                       "bits set", ull(entry), ull(guest));
    if (offset == 0 || has_data_file)
        return 0;           /* no host cluster here, or not in this file */
    if (!is_aligned(offset, img->cluster_size)) {
        owners_problem(w, at, "L2 entry 0x%llx for guest 0x%llx: data "
                       "cluster 0x%llx is not cluster aligned: not "
                       "followed", ull(entry), ull(guest), ull(offset));
        return 0;
    }
    snprintf(what, sizeof what, "data cluster for guest 0x%llx", ull(guest));
    if (img->extended_l2) {
        if (offset >= w->file_size)
            return claim(w, QCOW2_OWNER_DATA, offset, img->cluster_size,
                         guest, src, 0, at, what);
        return claim_subclusters(w, offset, guest, src, bitmap, at);
    }
    return claim(w, QCOW2_OWNER_DATA, offset, img->cluster_size, guest, src,
                 (entry & QCOW_OFLAG_ZERO) != 0, at, what);
}

static int walk_l2(own_walk *w, uint32_t src, uint64_t l2_offset,
                   uint64_t guest_base, uint8_t *table)
{
    qcow2_image *img = w->img;
    int ret = read_file(w, l2_offset, table, img->cluster_size, "L2 table");

    for (uint64_t j = 0; ret == 0 && j < img->l2_entries; j++) {
        const uint8_t *e = table + j * img->l2_entry_bytes;
        uint64_t bitmap = img->extended_l2 ? be64(e + 8) : 0;
        ret = walk_l2_entry(w, src, guest_base + (j << img->cluster_bits),
                            be64(e), bitmap,
                            l2_offset + j * img->l2_entry_bytes);
        ret = ret < 0 ? ret : 0;    /* not followed: the next entry */
    }
    return ret;
}

/* One L1 entry of `view`: its L2 table claimed and walked the first time
 * it is met; met again, the view is added to its readers. */
static int walk_l1_entry(own_walk *w, uint32_t view, uint64_t index,
                         uint64_t entry, uint64_t at, uint8_t *table)
{
    qcow2_image *img = w->img;
    uint64_t l2_offset = entry & L1E_OFFSET_MASK;
    uint64_t guest = index << (img->l2_bits + img->cluster_bits);
    own_source *src;
    size_t slot;
    int ret;

    if (entry & L1E_RESERVED_MASK)
        owners_problem(w, at, "L1 entry %llu (0x%llx) has reserved bits set",
                       ull(index), ull(entry));
    if (l2_offset == 0)
        return 0;
    if (!is_aligned(l2_offset, img->cluster_size) ||
        l2_offset >= w->file_size) {
        owners_problem(w, at, "L1 entry %llu: L2 table at 0x%llx is %s: not "
                       "followed", ull(index), ull(l2_offset),
                       l2_offset >= w->file_size ? "past the end of the file"
                                                 : "not cluster aligned");
        return 0;
    }
    if (w->n_sources * 2 >= w->hash_cap && (ret = hash_grow(w)) < 0)
        return ret;
    slot = hash_find(w, l2_offset);
    if (w->hash_values[slot]) {
        src = &w->sources[w->hash_values[slot] - 1];
        if (src->l1_index != index) {
            owners_problem(w, at, "L1 entry %llu points at the L2 table at "
                           "0x%llx, which L1 entry %llu also uses: walked "
                           "once", ull(index), ull(l2_offset),
                           ull(src->l1_index));
            return 0;
        }
        return add_view(w, src, view);
    }
    if (w->out_of_budget)
        return 0;
    if (w->n_sources == w->cap_sources) {
        size_t cap = w->cap_sources ? w->cap_sources * 2 : 64;
        own_source *grown = realloc(w->sources, cap * sizeof *grown);
        if (!grown)
            return QCOW2_E_NOMEM;
        w->sources = grown;
        w->cap_sources = cap;
    }
    src = &w->sources[w->n_sources];
    memset(src, 0, sizeof *src);
    src->l2_offset = l2_offset;
    src->l1_index = index;
    w->n_sources++;
    w->hash_keys[slot] = l2_offset;
    w->hash_values[slot] = (uint32_t)w->n_sources;
    if ((ret = add_view(w, src, view)) < 0 ||
        (ret = claim(w, QCOW2_OWNER_L2, l2_offset, img->cluster_size, guest,
                     (uint32_t)(w->n_sources - 1), 0, at, "L2 table")) < 0)
        return ret;
    return walk_l2(w, (uint32_t)(w->n_sources - 1), l2_offset, guest, table);
}

/* The L1 tree of one view; `at` names the field that points at the L1. */
static int walk_view(own_walk *w, uint32_t view, uint64_t l1_offset,
                     uint32_t l1_size, uint64_t at)
{
    qcow2_image *img = w->img;
    int kind = view ? QCOW2_OWNER_SNAPSHOT_L1 : QCOW2_OWNER_L1;
    uint8_t *raw, *table;
    uint64_t bytes = (uint64_t)l1_size * 8;
    int ret;

    if (l1_size == 0)
        return 0;
    if (l1_size > QCOW2_MAX_L1_BYTES / 8 ||
        !is_aligned(l1_offset, img->cluster_size)) {
        owners_problem(w, at, "%s L1 table at 0x%llx (%u entries) is %s: not "
                       "followed", owners_view_name(img, view),
                       ull(l1_offset), l1_size,
                       l1_size > QCOW2_MAX_L1_BYTES / 8 ? "too large"
                                                        : "not cluster aligned");
        return 0;
    }
    ret = claim(w, kind, l1_offset, bytes, 0, view ? view - 1 : 0, 0, at,
                "L1 table");
    if (ret != 0)
        return ret < 0 ? ret : 0;
    raw = malloc((size_t)bytes);
    table = malloc((size_t)img->cluster_size);
    if (!raw || !table) {
        free(raw);
        free(table);
        return QCOW2_E_NOMEM;
    }
    ret = read_file(w, l1_offset, raw, (size_t)bytes, "L1 table");
    for (uint32_t i = 0; ret == 0 && i < l1_size && !w->out_of_budget; i++)
        ret = walk_l1_entry(w, view, i, be64(raw + (uint64_t)i * 8),
                            l1_offset + (uint64_t)i * 8, table);
    free(raw);
    free(table);
    return ret;
}

/* ---- Cluster 0 -------------------------------------------------------------------- */

static int walk_header(own_walk *w)
{
    qcow2_image *img = w->img;
    const qcow2_header *h = &img->hdr;
    uint64_t end = h->header_length, limit = img->cluster_size;
    uint8_t marker[8];
    int ret;

    if ((ret = claim(w, QCOW2_OWNER_HEADER, 0, h->header_length, 0, 0, 0, 0,
                     "header")) != 0)
        return ret < 0 ? ret : 0;
    for (size_t i = 0; i < img->n_exts; i++)
        end = max_u64(end, img->exts[i].file_offset +
                               align_up(img->exts[i].length, 8));
    if (h->backing_file_offset > end && h->backing_file_offset < limit)
        limit = h->backing_file_offset;
    /* the end-of-extensions marker: 8 bytes, magic 0 */
    if (end + 8 <= limit) {
        if ((ret = read_file(w, end, marker, 8, "header extensions")) < 0)
            return ret;
        if (be32(marker) == 0)
            end += 8;
    }
    if ((ret = claim(w, QCOW2_OWNER_HEADER_EXTENSION, h->header_length,
                     end - h->header_length, 0, 0, 0, 0,
                     "header extensions")) < 0)
        return ret;
    if (h->backing_file_offset && h->backing_file_size)
        ret = claim(w, QCOW2_OWNER_BACKING_NAME, h->backing_file_offset,
                    h->backing_file_size, 0, 0, 0, HDR_AT_BACKING,
                    "backing file name");
    return ret < 0 ? ret : 0;
}

/* ---- Refcount structures ------------------------------------------------------------ */

static int walk_refcounts(own_walk *w)
{
    qcow2_image *img = w->img;
    uint64_t offset = img->hdr.refcount_table_offset;
    uint64_t bytes = (uint64_t)img->hdr.refcount_table_clusters
                     << img->cluster_bits;
    uint8_t *raw;
    int ret;

    if (bytes == 0)
        return 0;
    if (offset == 0 || !is_aligned(offset, img->cluster_size) ||
        bytes > QCOW2_MAX_REFTABLE_BYTES) {
        owners_problem(w, HDR_AT_REFTABLE, "refcount table at 0x%llx (%llu "
                       "bytes) is %s: refcounts not followed", ull(offset),
                       ull(bytes), bytes > QCOW2_MAX_REFTABLE_BYTES
                           ? "too large" : offset ? "not cluster aligned"
                                                  : "at offset 0");
        return 0;
    }
    if ((ret = claim(w, QCOW2_OWNER_REFCOUNT_TABLE, offset, bytes, 0, 0, 0,
                     HDR_AT_REFTABLE, "refcount table")) != 0)
        return ret < 0 ? ret : 0;
    raw = malloc((size_t)bytes);
    w->reftable = malloc((size_t)bytes);
    if (!raw || !w->reftable) {
        free(raw);
        return QCOW2_E_NOMEM;
    }
    w->reftable_entries = bytes / 8;
    if ((ret = read_file(w, offset, raw, (size_t)bytes,
                         "refcount table")) < 0) {
        free(raw);
        return ret;
    }
    for (uint64_t i = 0; ret == 0 && i < w->reftable_entries; i++) {
        uint64_t entry = be64(raw + i * 8);
        uint64_t block = entry & REFT_OFFSET_MASK;
        uint64_t at = offset + i * 8;

        w->reftable[i] = UINT64_MAX;    /* unusable unless proved fine */
        if (entry & REFT_RESERVED_MASK) {
            owners_problem(w, at, "refcount table entry %llu (0x%llx) has "
                           "reserved bits set: not followed", ull(i),
                           ull(entry));
            continue;
        }
        if (block == 0) {
            w->reftable[i] = 0;
            continue;
        }
        if (!is_aligned(block, img->cluster_size)) {
            owners_problem(w, at, "refcount block %llu at 0x%llx is not "
                           "cluster aligned: not followed", ull(i),
                           ull(block));
            continue;
        }
        ret = claim(w, QCOW2_OWNER_REFCOUNT_BLOCK, block, img->cluster_size,
                    0, (uint32_t)i, 0, at, "refcount block");
        if (ret == 0 && range_inside(block, img->cluster_size,
                                     align_up(w->file_size,
                                              img->cluster_size)))
            w->reftable[i] = block;
        ret = ret < 0 ? ret : 0;
    }
    free(raw);
    return ret;
}

/* ---- Bitmaps ------------------------------------------------------------------------- */

static int walk_bitmap_table(own_walk *w, uint32_t n, uint64_t table_offset,
                             uint32_t table_size, uint64_t at)
{
    qcow2_image *img = w->img;
    uint64_t bytes = (uint64_t)table_size * 8;
    uint8_t *raw;
    int ret;

    if (!is_aligned(table_offset, img->cluster_size)) {
        owners_problem(w, at, "bitmap table at 0x%llx is not cluster "
                       "aligned: not followed", ull(table_offset));
        return 0;
    }
    if (bytes == 0 || !range_inside(table_offset, bytes, w->file_size)) {
        if (bytes)
            owners_problem(w, at, "bitmap table at 0x%llx (%u entries) runs "
                           "past the end of the file: not followed",
                           ull(table_offset), table_size);
        return 0;
    }
    if ((ret = claim(w, QCOW2_OWNER_BITMAP_TABLE, table_offset, bytes, 0, n,
                     0, at, "bitmap table")) != 0)
        return ret < 0 ? ret : 0;
    raw = malloc((size_t)bytes);
    if (!raw)
        return QCOW2_E_NOMEM;
    ret = read_file(w, table_offset, raw, (size_t)bytes, "bitmap table");
    for (uint32_t i = 0; ret == 0 && i < table_size; i++) {
        uint64_t entry = be64(raw + (uint64_t)i * 8);
        uint64_t offset = entry & BME_OFFSET_MASK;
        if ((entry & BME_RESERVED_MASK) ||
            (offset && ((entry & BME_FLAG_ALL_ONES) ||
                        !is_aligned(offset, img->cluster_size)))) {
            owners_problem(w, table_offset + (uint64_t)i * 8, "bitmap table "
                           "entry %u (0x%llx) is invalid: not followed", i,
                           ull(entry));
            continue;
        }
        if (offset)
            ret = claim(w, QCOW2_OWNER_BITMAP_DATA, offset,
                        img->cluster_size, (uint64_t)i * img->cluster_size,
                        n, 0, table_offset + (uint64_t)i * 8, "bitmap data");
        ret = ret < 0 ? ret : 0;
    }
    free(raw);
    return ret;
}

static int walk_bitmaps(own_walk *w)
{
    const qcow2_ext_info *ext = &w->img->ext;
    uint64_t dir_offset = ext->bitmap_directory_offset;
    uint64_t dir_size = ext->bitmap_directory_size, at = 0;
    uint8_t *dir;
    int ret;

    if (!ext->has_bitmaps || dir_size == 0)
        return 0;
    if ((ret = claim(w, QCOW2_OWNER_BITMAP_DIRECTORY, dir_offset, dir_size,
                     0, 0, 0, 0, "bitmap directory")) != 0)
        return ret < 0 ? ret : 0;
    if (!range_inside(dir_offset, dir_size, w->file_size))
        return 0;       /* cut by claim; the entries are not followed */
    dir = malloc((size_t)dir_size);
    if (!dir)
        return QCOW2_E_NOMEM;
    ret = read_file(w, dir_offset, dir, (size_t)dir_size,
                    "bitmap directory");
    for (uint32_t n = 0; ret == 0 && n < ext->nb_bitmaps; n++) {
        uint64_t entry_size;
        if (dir_size - at < BITMAP_ENTRY_FIXED)
            break;
        entry_size = align_up(BITMAP_ENTRY_FIXED + be32(dir + at + 20) +
                              (uint64_t)be16(dir + at + 18), 8);
        if (entry_size > dir_size - at) {
            owners_problem(w, dir_offset + at, "bitmap directory entry %u "
                           "runs past the directory", n);
            break;
        }
        ret = walk_bitmap_table(w, n, be64(dir + at), be32(dir + at + 8),
                                dir_offset + at);
        at += entry_size;
    }
    free(dir);
    return ret;
}

/* ---- The walk ------------------------------------------------------------------------- */

int owners_walk(own_walk *w)
{
    qcow2_image *img = w->img;
    const qcow2_header *h = &img->hdr;
    int ret;

    w->budget = 16 * (w->file_size >> img->cluster_bits) + (1u << 20);
    if ((ret = hash_grow(w)) < 0 || (ret = walk_header(w)) < 0)
        return ret;
    if ((ret = walk_view(w, 0, h->l1_table_offset, h->l1_size,
                         HDR_AT_L1)) < 0)
        return ret;
    for (uint32_t i = 0; i < img->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &img->snapshots[i];
        if ((ret = walk_view(w, i + 1, sn->l1_table_offset, sn->l1_size,
                             sn->entry_offset)) < 0)
            return ret;
    }
    if (h->nb_snapshots && !img->nb_snapshots)
        owners_problem(w, HDR_AT_SNAPSHOTS, "snapshot table at 0x%llx (%u "
                       "entries) was not loaded: not followed",
                       ull(h->snapshots_offset), h->nb_snapshots);
    if (img->nb_snapshots &&
        (ret = claim(w, QCOW2_OWNER_SNAPSHOT_TABLE, h->snapshots_offset,
                     qcow2_snapshot_table_size(img), 0, 0, 0,
                     HDR_AT_SNAPSHOTS, "snapshot table")) < 0)
        return ret;
    if ((ret = walk_refcounts(w)) < 0)
        return ret;
    if (img->ext.has_crypto_header &&
        (ret = claim(w, QCOW2_OWNER_CRYPTO_HEADER,
                     img->ext.crypto_header_offset,
                     img->ext.crypto_header_length, 0, 0, 0, 0,
                     "crypto header")) < 0)
        return ret;
    return walk_bitmaps(w);
}

void owners_walk_free(own_walk *w)
{
    for (size_t i = 0; i < w->n_sources; i++)
        free(w->sources[i].views);
    for (size_t i = 0; i < w->n_problems; i++)
        free(w->problems[i].text);
    free(w->claims);
    free(w->sources);
    free(w->hash_keys);
    free(w->hash_values);
    free(w->problems);
    free(w->reftable);
    memset(w, 0, sizeof *w);
}
