/*
 * qemu-img check, the walk: every structure that references host clusters
 * adds its references to the in-memory refcount table, in the order of
 * QEMU's calculate_refcounts (header, active L1 tree with the allocation
 * statistics, snapshot L1 trees, snapshot table, refcount table, LUKS
 * header, bitmaps, refcount blocks). Entries are checked on the way with
 * qemu-img's messages; a few checks stricter than qemu-img are reported
 * as QCOW2_FINDING_STRICT and counted nowhere.
 */
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define L2_BITMAP_ALL_ALLOC     0x00000000ffffffffull
#define BME_RESERVED_MASK       0xff000000000001feull
#define BME_OFFSET_MASK         0x00fffffffffffe00ull
#define BME_FLAG_ALL_ONES       1ull
#define BITMAP_ENTRY_FIXED      24u

/* ---- L2 tables ---------------------------------------------------------------- */

typedef struct l2_walk {
    uint64_t l2_offset;
    int flags;                  /* CHECK_FRAG_INFO for the active tables */
    int copied;                 /* the COPIED check of its entries too */
    uint64_t next_contiguous;   /* QEMU resets it for every L2 table */
} l2_walk;

/* QEMU's qcow2_parse_compressed_l2_entry: stream offset and the sector
 * rounded length from it to the end of its last sector. */
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

static int check_compressed_entry(check_state *st, l2_walk *w, uint64_t i,
                                  uint64_t entry, uint64_t bitmap,
                                  uint64_t entry_offset)
{
    qcow2_check_result *res = st->res;
    uint64_t coffset, csize;
    int ret;

    parse_compressed(st->img, entry, &coffset, &csize);
    if (entry & QCOW_OFLAG_COPIED)
        check_corrupt(st, entry_offset, "ERROR: coffset=0x%llx: copied flag "
                      "must never be set for compressed clusters",
                      ull(coffset));
    if (st->has_data_file) {
        check_corrupt(st, entry_offset, "ERROR compressed cluster %llu with "
                      "data file, entry=0x%llx", ull(i), ull(entry));
        return 0;
    }
    if (bitmap) {
        check_corrupt(st, entry_offset, "ERROR compressed cluster %llu with "
                      "non-zero subcluster allocation bitmap, entry=0x%llx",
                      ull(i), ull(entry));
        return 0;
    }
    if ((ret = check_inc(st, coffset, csize)) < 0)
        return ret;
    if (w->flags & CHECK_FRAG_INFO) {
        res->allocated_clusters++;
        res->compressed_clusters++;
        /* compressed clusters are fragmented by nature (QEMU) */
        res->fragmented_clusters++;
    }
    return 0;
}

/* NORMAL and ZERO_ALLOC entries. */
static int check_allocated_entry(check_state *st, l2_walk *w, uint64_t entry,
                                 uint64_t bitmap, uint64_t entry_offset)
{
    qcow2_image *img = st->img;
    qcow2_check_result *res = st->res;
    uint64_t offset = entry & L2E_OFFSET_MASK;

    if ((bitmap >> 32) & bitmap)
        check_corrupt(st, entry_offset, "ERROR offset=%llx: Allocated "
                      "cluster has corrupted subcluster allocation bitmap",
                      ull(offset));
    if (!is_aligned(offset, img->cluster_size)) {
        int has_data = img->extended_l2 ? (bitmap & L2_BITMAP_ALL_ALLOC) != 0
                                        : !(entry & QCOW_OFLAG_ZERO);
        if (has_data)
            check_corrupt(st, entry_offset, "ERROR offset=%llx: Data cluster "
                          "is not properly aligned; L2 entry corrupted.",
                          ull(offset));
        else
            check_corrupt(st, entry_offset, "ERROR offset=%llx: Preallocated "
                          "cluster is not properly aligned; L2 entry "
                          "corrupted.", ull(offset));
    }
    if (w->flags & CHECK_FRAG_INFO) {
        res->allocated_clusters++;
        if (w->next_contiguous && offset != w->next_contiguous)
            res->fragmented_clusters++;
        w->next_contiguous = offset + img->cluster_size;
    }
    /* clusters of an external data file are not refcounted */
    return st->has_data_file ? 0 : check_inc(st, offset, img->cluster_size);
}

/* QEMU's check_refcounts_l2 over one table (read as it lies, even when
 * its offset is unaligned or past the end of the file). */
static int check_l2(check_state *st, l2_walk *w, const uint8_t *table)
{
    qcow2_image *img = st->img;
    uint32_t entry_bytes = img->l2_entry_bytes;
    int ret;

    for (uint64_t i = 0; i < img->l2_entries; i++) {
        uint64_t entry, bitmap, entry_offset, offset;
        int zero_flag;

        /* unused entries (0, bitmap 0) have nothing to check: eight at
         * once where a sparse table has runs of them */
        if ((i & 7) == 0 && i + 8 <= img->l2_entries &&
            check_bytes_zero(table + i * entry_bytes,
                             8 * (size_t)entry_bytes)) {
            i += 7;
            continue;
        }
        if (check_bytes_zero(table + i * entry_bytes, entry_bytes))
            continue;
        entry = be64(table + i * entry_bytes);
        if (w->copied && entry)
            check_copied_l2(st, w->l2_offset, i, entry);
        bitmap = img->extended_l2
                     ? be64(table + i * entry_bytes + 8) : 0;
        entry_offset = w->l2_offset + i * entry_bytes;
        offset = entry & L2E_OFFSET_MASK;
        zero_flag = (entry & QCOW_OFLAG_ZERO) && !img->extended_l2;

        if (entry & QCOW_OFLAG_COMPRESSED) {
            ret = check_compressed_entry(st, w, i, entry, bitmap,
                                         entry_offset);
            if (ret < 0)
                return ret;
            continue;
        }
        if (entry & L2E_RESERVED_MASK)
            check_corrupt(st, entry_offset, "ERROR found l2 entry with "
                          "reserved bits set: %llx", ull(entry));
        if (zero_flag && img->hdr.version < 3)
            check_note(st, QCOW2_FINDING_STRICT, entry_offset,
                       "zero flag in a version 2 image: l2_entry=%llx (the "
                       "flag exists from version 3 on; qemu-img check does "
                       "not report it, stricter than qemu-img)", ull(entry));
        if (offset != 0 ||
            (!zero_flag && st->has_data_file && (entry & QCOW_OFLAG_COPIED))) {
            ret = check_allocated_entry(st, w, entry, bitmap, entry_offset);
            if (ret < 0)
                return ret;
        } else if (!zero_flag && (bitmap & L2_BITMAP_ALL_ALLOC)) {
            check_corrupt(st, entry_offset, "ERROR: Unallocated cluster has "
                          "non-zero subcluster allocation map");
        }
    }
    return 0;
}

/* ---- L1 tables ------------------------------------------------------------------ */

/* QEMU's check_refcounts_l1. *kept (may be NULL) gets the entries read.
 * The L2 tables are read in runs (check_tables), walked in L1 order. */
static int check_l1(check_state *st, uint64_t l1_offset, uint32_t l1_size,
                    int flags, uint64_t **kept)
{
    qcow2_image *img = st->img;
    check_tables tables;
    uint8_t *raw, *table;
    uint64_t *l1;
    int ret;

    if (l1_size == 0)
        return 0;
    if ((ret = check_inc(st, l1_offset, (uint64_t)l1_size * 8)) < 0)
        return ret;
    memset(&tables, 0, sizeof tables);
    raw = malloc((size_t)l1_size * 8);
    l1 = malloc((size_t)l1_size * sizeof *l1);
    if (!raw || !l1) {
        free(raw);
        free(l1);
        st->res->check_errors++;
        return QCOW2_E_NOMEM;
    }
    ret = check_pread(st, l1_offset, raw, (size_t)l1_size * 8, "L1 table");
    for (uint32_t i = 0; ret == 0 && i < l1_size; i++)
        l1[i] = be64(raw + (uint64_t)i * 8);
    free(raw);
    if (ret == 0 && (ret = check_tables_open(&tables, st, l1, l1_size,
                                              1)) < 0)
        st->res->check_errors++;

    for (uint32_t i = 0; ret == 0 && i < l1_size; i++) {
        l2_walk w = { l1[i] & L1E_OFFSET_MASK, flags, 0, 0 };
        uint64_t entry_offset = l1_offset + (uint64_t)i * 8;

        if (l1[i] == 0)
            continue;
        if (l1[i] & L1E_RESERVED_MASK)
            check_corrupt(st, entry_offset, "ERROR found L1 entry with "
                          "reserved bits set: %llx", ull(l1[i]));
        if ((ret = check_inc(st, w.l2_offset, img->cluster_size)) < 0)
            break;
        if (!is_aligned(w.l2_offset, img->cluster_size))
            check_corrupt(st, entry_offset, "ERROR l2_offset=%llx: Table is "
                          "not cluster aligned; L1 entry corrupted",
                          ull(w.l2_offset));
        if (check_tables_get(&tables, i, &table) < 0) {
            ret = QCOW2_E_IO;
            break;
        }
        /* QEMU's COPIED check of the active tables, while they are here */
        w.copied = (flags & CHECK_FRAG_INFO) && st->copied_in_walk &&
                   w.l2_offset != 0 && check_copied_l1(st, i, l1[i]);
        ret = check_l2(st, &w, table);
    }
    check_tables_close(&tables);
    if (ret == 0 && kept) {
        *kept = l1;
        return 0;
    }
    free(l1);
    return ret;
}

/* ---- Snapshots ------------------------------------------------------------------ */

/* What QEMU's snapshot table check reports (the rest of it is refused
 * when the image is opened). */
static void check_snapshot_table(check_state *st)
{
    qcow2_image *img = st->img;

    for (uint32_t i = 0; i < img->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &img->snapshots[i];
        if (img->hdr.version >= 3 && sn->extra_data_size < CHECK_SNAPSHOT_EXTRA_V3)
            check_corrupt(st, sn->entry_offset, "ERROR: Snapshot table entry "
                          "%u is incomplete", i);
    }
}

static int check_snapshots(check_state *st)
{
    qcow2_image *img = st->img;
    int ret;

    if (st->has_data_file && img->nb_snapshots)
        check_corrupt(st, img->hdr.snapshots_offset, "ERROR %u snapshots in "
                      "image with data file", img->nb_snapshots);
    for (uint32_t i = 0; i < img->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &img->snapshots[i];
        if (!is_aligned(sn->l1_table_offset, img->cluster_size)) {
            check_corrupt(st, sn->entry_offset, "ERROR snapshot %s (%s) "
                          "l1_offset=%#llx: L1 table is not cluster aligned; "
                          "snapshot table entry corrupted", sn->id, sn->name,
                          ull(sn->l1_table_offset));
            continue;
        }
        if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8) {
            check_corrupt(st, sn->entry_offset, "ERROR snapshot %s (%s) "
                          "l1_size=%#x: L1 table is too large; snapshot table "
                          "entry corrupted", sn->id, sn->name, sn->l1_size);
            continue;
        }
        ret = check_l1(st, sn->l1_table_offset, sn->l1_size, 0, NULL);
        if (ret < 0)
            return ret;
    }
    return check_inc(st, img->hdr.snapshots_offset,
                     qcow2_snapshot_table_size(img));
}

/* ---- Bitmaps -------------------------------------------------------------------- */

static int check_bitmap_table(check_state *st, uint64_t table_offset,
                              uint32_t table_size)
{
    qcow2_image *img = st->img;
    uint8_t *raw;
    int ret;

    if ((ret = check_inc(st, table_offset, (uint64_t)table_size * 8)) < 0)
        return ret;
    if (!is_aligned(table_offset, img->cluster_size) ||
        !range_inside(table_offset, (uint64_t)table_size * 8,
                      st->file_size)) {
        check_corrupt(st, table_offset, "ERROR bitmap table at 0x%llx (%u "
                      "entries) is unaligned or outside the image",
                      ull(table_offset), table_size);
        return 1;
    }
    raw = malloc((size_t)table_size * 8);
    if (!raw) {
        st->res->check_errors++;
        return QCOW2_E_NOMEM;
    }
    if (check_pread(st, table_offset, raw, (size_t)table_size * 8,
                    "bitmap table") < 0) {
        free(raw);
        return 1;
    }
    for (uint32_t i = 0; ret == 0 && i < table_size; i++) {
        uint64_t entry = be64(raw + (uint64_t)i * 8);
        uint64_t offset = entry & BME_OFFSET_MASK;
        if ((entry & BME_RESERVED_MASK) ||
            (offset && ((entry & BME_FLAG_ALL_ONES) ||
                        !is_aligned(offset, img->cluster_size)))) {
            check_corrupt(st, table_offset + (uint64_t)i * 8, "ERROR bitmap "
                          "table entry %u is invalid: %llx", i, ull(entry));
            continue;
        }
        if (offset)
            ret = check_inc(st, offset, img->cluster_size);
    }
    free(raw);
    return ret;
}

/* QEMU's qcow2_check_bitmaps_refcounts: the directory, each bitmap table
 * and its data clusters. Only when the autoclear bit vouches for them
 * (QEMU ignores the extension otherwise). */
static int check_bitmaps(check_state *st)
{
    qcow2_image *img = st->img;
    const qcow2_ext_info *ext = &img->ext;
    uint64_t dir_offset = ext->bitmap_directory_offset;
    uint64_t dir_size = ext->bitmap_directory_size, at = 0;
    uint8_t *dir;
    int ret;

    if (!ext->has_bitmaps || !(img->hdr.autoclear_features &
                               AUTOCLEAR_BITMAPS))
        return 0;
    if ((ret = check_inc(st, dir_offset, dir_size)) < 0)
        return ret;
    if (!range_inside(dir_offset, dir_size, st->file_size)) {
        check_corrupt(st, dir_offset, "ERROR bitmap directory at 0x%llx "
                      "(%llu bytes) is outside the image", ull(dir_offset),
                      ull(dir_size));
        return 0;
    }
    dir = malloc((size_t)dir_size + 1);
    if (!dir) {
        st->res->check_errors++;
        return QCOW2_E_NOMEM;
    }
    if (check_pread(st, dir_offset, dir, (size_t)dir_size,
                    "bitmap directory") < 0) {
        free(dir);
        return 0;
    }
    for (uint32_t n = 0; ret == 0 && n < ext->nb_bitmaps; n++) {
        uint64_t entry_size;
        if (dir_size - at < BITMAP_ENTRY_FIXED) {
            check_corrupt(st, dir_offset + at, "ERROR bitmap directory is "
                          "too short for %u bitmaps", ext->nb_bitmaps);
            break;
        }
        entry_size = align_up(BITMAP_ENTRY_FIXED + be32(dir + at + 20) +
                              (uint64_t)be16(dir + at + 18), 8);
        if (entry_size > dir_size - at) {
            check_corrupt(st, dir_offset + at, "ERROR bitmap directory entry "
                          "%u runs past the directory", n);
            break;
        }
        ret = check_bitmap_table(st, be64(dir + at), be32(dir + at + 8));
        if (ret == 1) {     /* QEMU stops at a table it cannot load */
            ret = 0;
            break;
        }
        at += entry_size;
    }
    free(dir);
    return ret;
}

/* ---- Refcount blocks -------------------------------------------------------------- */

/* QEMU's check_refblocks (read-only: nothing is moved or extended). */
static int check_refblocks(check_state *st)
{
    qcow2_image *img = st->img;
    int ret;

    for (uint64_t i = 0; i < img->reftable_entries; i++) {
        uint64_t raw = img->reftable[i];
        uint64_t offset = raw & REFT_OFFSET_MASK;
        uint64_t cluster = offset >> img->cluster_bits;
        uint64_t entry_offset = img->hdr.refcount_table_offset + i * 8;

        if (raw & REFT_RESERVED_MASK) {
            check_corrupt(st, entry_offset, "ERROR refcount table entry %llu "
                          "has reserved bits set", ull(i));
            continue;
        }
        if (!is_aligned(offset, img->cluster_size)) {
            check_corrupt(st, entry_offset, "ERROR refcount block %llu is not "
                          "cluster aligned; refcount table entry corrupted",
                          ull(i));
            continue;
        }
        if (cluster >= st->nb_clusters) {
            st->refblocks_outside++;
            check_corrupt(st, entry_offset, "ERROR refcount block %llu is "
                          "outside image", ull(i));
            continue;
        }
        if (offset == 0)
            continue;
        if ((ret = check_inc(st, offset, img->cluster_size)) < 0)
            return ret;
        if (st->counts[cluster] != 1)
            check_corrupt(st, offset, "ERROR refcount block %llu "
                          "refcount=%llu", ull(i),
                          ull(st->counts[cluster]));
    }
    return 0;
}

/* ---- The walk ---------------------------------------------------------------------- */

int check_walk(check_state *st)
{
    qcow2_image *img = st->img;
    const qcow2_header *h = &img->hdr;
    int ret;

    check_snapshot_table(st);
    if ((ret = check_inc(st, 0, img->cluster_size)) < 0)
        return ret;
    ret = check_l1(st, h->l1_table_offset, h->l1_size, CHECK_FRAG_INFO,
                   &st->active_l1);
    if (ret < 0)
        return ret == QCOW2_E_IO ? 0 : ret;     /* counted: stop as QEMU */
    st->active_l1_size = st->active_l1 ? h->l1_size : 0;
    if ((ret = check_snapshots(st)) < 0)
        return ret == QCOW2_E_IO ? 0 : ret;
    ret = check_inc(st, h->refcount_table_offset,
                    (uint64_t)h->refcount_table_clusters << img->cluster_bits);
    if (ret == 0 && img->ext.has_crypto_header)
        ret = check_inc(st, img->ext.crypto_header_offset,
                        img->ext.crypto_header_length);
    if (ret == 0)
        ret = check_bitmaps(st);
    if (ret == 0)
        ret = check_refblocks(st);
    return ret;
}

/* ---- Stricter than qemu-img ---------------------------------------------------------- */

/* qemu-img compares refcounts only up to the end of the file (or of the
 * last reference); a refcount above 0 further on claims clusters that do
 * not exist. Harmless for QEMU, worth a word for a forensic reader. */
int check_strict_tail(check_state *st)
{
    qcow2_image *img = st->img;
    uint64_t reported = 0;

    for (uint64_t t = st->nb_clusters / img->refblock_entries;
         t < img->reftable_entries; t++) {
        uint64_t offset = img->reftable[t] & REFT_OFFSET_MASK;
        if (offset == 0 || (img->reftable[t] & REFT_RESERVED_MASK) ||
            !is_aligned(offset, img->cluster_size) ||
            !range_inside(offset, img->cluster_size, st->file_size))
            continue;   /* reported by check_refblocks */
        for (uint64_t i = 0; i < img->refblock_entries; i++) {
            uint64_t cluster = t * img->refblock_entries + i, refcount;
            if (cluster < st->nb_clusters)
                continue;
            if (check_disk_refcount(st, cluster, &refcount) < 0)
                return 0;
            if (refcount == 0)
                continue;
            if (reported++ < 100)
                check_note(st, QCOW2_FINDING_STRICT,
                           cluster << img->cluster_bits, "cluster %llu past "
                           "the end of the file has refcount=%llu "
                           "reference=0 (qemu-img check does not look past "
                           "the end of the file; stricter than qemu-img)",
                           ull(cluster), ull(refcount));
        }
    }
    if (reported > 100)
        check_note(st, QCOW2_FINDING_STRICT, st->file_size, "%llu more "
                   "clusters past the end of the file have a refcount above "
                   "0 (stricter than qemu-img)", ull(reported - 100));
    return 0;
}

/* The references of every structure counted into st->counts, for callers
 * outside check (repair, whole-state switches). */
int check_count_references(qcow2_image *img, check_state *st,
                           qcow2_check_result *scratch)
{
    int ret = check_state_init(st, img, QCOW2_REPAIR_NONE, scratch);

    if (ret == 0)
        ret = check_walk(st);
    return ret;
}
