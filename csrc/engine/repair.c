/*
 * qemu-img check -r all (QEMU's qcow2_check_refcounts with
 * BDRV_FIX_ERRORS and rebuild_refcount_structure, in this engine's own
 * order): what check.c found is mended in three steps, each one safe to
 * interrupt.
 *
 *   1. Table entries that cannot be followed (reserved bits, unaligned,
 *      pointing past the end of the file) are cleared: the guest range
 *      reads as unallocated. References only go away here, so a crash
 *      leaves leaks at worst.
 *   2. Refcounts too low are raised; when the refcount structure itself
 *      is broken (bad or missing refcount table entries, refcount blocks
 *      outside the image or shared, a referenced cluster at refcount 0)
 *      it is rebuilt from the counted references at fresh clusters past
 *      everything in use, and the header switched to it in one synced
 *      write. The old structures are leaks from then on.
 *   3. (check.c) leaks are freed, then the COPIED flags of the active
 *      tables set from the refcounts now on disk.
 *
 * Every change is a finding of kind QCOW2_FINDING_REPAIRED.
 */
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* A small check_state that only carries img and res, for check_note. */
static void note_state(check_state *st, qcow2_image *img,
                       qcow2_check_result *res)
{
    memset(st, 0, sizeof *st);
    st->img = img;
    st->res = res;
}

/* A repair write that would overwrite other metadata is not attempted:
 * the overlap check would mark the image corrupt and stop the repair
 * half done, worse than it was. The problem stays, and is reported by
 * the check that ends the repair. 1 when blocked. */
static int write_blocked(qcow2_image *img, qcow2_check_result *res,
                         int ignore, uint64_t offset, uint64_t length,
                         const char *what)
{
    check_state st;

    if (!qcow2_overlap_find(img, ignore, offset, length))
        return 0;
    note_state(&st, img, res);
    check_note(&st, QCOW2_FINDING_STRICT, offset, "Not repairing the %s at "
               "0x%llx: the write would overlap other metadata", what,
               ull(offset));
    return 1;
}

/* ---- Step 1: entries that cannot be followed ------------------------------ */

/* The repaired form of an L2 entry (the entry itself when it is fine). */
static uint64_t mend_l2_entry(const qcow2_image *img, uint64_t entry,
                              uint64_t file_size, int has_data_file)
{
    uint64_t offset = entry & L2E_OFFSET_MASK;
    int zero_flag = (entry & QCOW_OFLAG_ZERO) && !img->extended_l2;

    if (entry & QCOW_OFLAG_COMPRESSED) {
        uint32_t shift = 62 - (img->cluster_bits - 8);
        uint64_t coffset = entry & ((1ull << shift) - 1);
        if (has_data_file || coffset >= file_size ||
            coffset < img->cluster_size)
            return 0;
        /* the COPIED flag must never be set on compressed clusters */
        return entry & ~QCOW_OFLAG_COPIED;
    }
    if (entry & L2E_RESERVED_MASK)
        return 0;
    if (offset == 0)
        return entry;
    if (!is_aligned(offset, img->cluster_size))
        /* QEMU's fix of an unaligned preallocated zero cluster: a plain
         * zero cluster; unaligned data cannot be trusted at all */
        return zero_flag ? QCOW_OFLAG_ZERO : 0;
    if (!has_data_file && (offset >= file_size || offset < img->cluster_size))
        return 0;
    return entry;
}

/* One L2 table: bad entries cleared in place (one write of the table).
 * A write the overlap check would refuse counts in *blocked. */
static int mend_l2(qcow2_image *img, qcow2_check_result *res,
                   uint64_t l2_offset, uint64_t file_size, uint8_t *table,
                   uint64_t *blocked)
{
    uint32_t entry_bytes = img->l2_entry_bytes;
    int has_data_file = qcow2_has_data_file(img), changed = 0, rc;
    check_state st;

    note_state(&st, img, res);
    rc = qcow2_read_meta(img, l2_offset, table, img->cluster_size,
                         "L2 table");
    if (rc < 0)
        return rc;
    for (uint64_t i = 0; !changed && i < img->l2_entries; i++) {
        uint64_t entry = be64(table + i * entry_bytes);
        changed = mend_l2_entry(img, entry, file_size, has_data_file) !=
                  entry;
    }
    if (!changed)
        return 0;
    /* nothing is reported repaired that is not written */
    if (write_blocked(img, res, OVERLAP_ACTIVE_L2 | OVERLAP_INACTIVE_L2,
                      l2_offset, img->cluster_size, "L2 table")) {
        ++*blocked;
        return 0;
    }
    for (uint64_t i = 0; i < img->l2_entries; i++) {
        uint64_t entry = be64(table + i * entry_bytes);
        uint64_t mended = mend_l2_entry(img, entry, file_size,
                                        has_data_file);
        if (mended == entry)
            continue;
        put_be64(table + i * entry_bytes, mended);
        if (img->extended_l2 && mended == 0)
            put_be64(table + i * entry_bytes + 8, 0);
        check_note(&st, QCOW2_FINDING_REPAIRED, l2_offset + i * entry_bytes,
                   "Repairing L2 entry %llu of the table at 0x%llx: "
                   "%llx -> %llx", ull(i), ull(l2_offset), ull(entry),
                   ull(mended));
    }
    rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2 | OVERLAP_INACTIVE_L2,
                             "l2", l2_offset, table, img->cluster_size);
    qcow2_l2_cache_drop(img->l2_cache, l2_offset);
    return rc;
}

/* Can an L1 entry be followed to an L2 table inside the file? */
static int l1_entry_usable(const qcow2_image *img, uint64_t entry,
                           uint64_t file_size)
{
    uint64_t l2_offset = entry & L1E_OFFSET_MASK;

    return !(entry & L1E_RESERVED_MASK) && l2_offset != 0 &&
           is_aligned(l2_offset, img->cluster_size) &&
           l2_offset >= img->cluster_size &&
           range_inside(l2_offset, img->cluster_size, file_size);
}

/* Entries [first, last] of an L1 table written from l1[] (host order),
 * or 1 when the overlap check would refuse the write (nothing written). */
static int write_l1_span(qcow2_image *img, uint64_t l1_offset,
                         const uint64_t *l1, uint32_t first, uint32_t last,
                         int quiet, qcow2_check_result *res, uint8_t *buf)
{
    uint64_t offset = l1_offset + (uint64_t)first * 8;
    size_t length = ((size_t)(last - first) + 1) * 8;
    int ignore = OVERLAP_ACTIVE_L1 | OVERLAP_INACTIVE_L1;

    if (quiet ? qcow2_overlap_find(img, ignore, offset, length) != 0
              : write_blocked(img, res, ignore, offset, length, "L1 entry"))
        return 1;
    for (uint32_t j = first; j <= last; j++)
        put_be64(buf + (size_t)(j - first) * 8, l1[j]);
    return qcow2_write_checked(img, ignore, "l1", offset, buf, length);
}

/* One L1 table (active when `active`): every L2 table it holds mended,
 * then the bad entries cleared, one write per cluster of the table (a
 * hostile table of millions of entries costs as many writes as it has
 * clusters); where that write is refused, one entry at a time, as an
 * entry cleared may be what stood in the way of the next. */
static int mend_l1(qcow2_image *img, qcow2_check_result *res,
                   uint64_t l1_offset, uint32_t l1_size, int active,
                   uint64_t file_size, uint8_t *table, uint64_t *blocked)
{
    uint32_t per_cluster = (uint32_t)(img->cluster_size / 8);
    uint64_t *l1 = NULL, *old;
    uint8_t *buf;
    check_state st;
    int rc;

    note_state(&st, img, res);
    if (l1_size == 0)
        return 0;
    buf = malloc((size_t)img->cluster_size * 2);
    if (!buf)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    old = (uint64_t *)(void *)(buf + img->cluster_size);
    rc = qcow2_l1_load(img, l1_offset, l1_size, "L1 table", &l1);
    for (uint32_t c = 0; rc == 0 && c < l1_size; c += per_cluster) {
        uint32_t end = l1_size - c < per_cluster ? l1_size : c + per_cluster;
        uint32_t first = end, last = 0;

        for (uint32_t i = c; rc == 0 && i < end; i++) {
            if (l1[i] == 0)
                continue;
            if (l1_entry_usable(img, l1[i], file_size)) {
                rc = mend_l2(img, res, l1[i] & L1E_OFFSET_MASK, file_size,
                             table, blocked);
                continue;
            }
            first = i < first ? i : first;
            last = i;
        }
        if (rc < 0 || first == end)
            continue;
        {
            uint32_t span = last - first + 1;

            memcpy(old, l1 + first, (size_t)span * 8);
            for (uint32_t i = first; i <= last; i++)
                if (l1[i] && !l1_entry_usable(img, l1[i], file_size))
                    l1[i] = 0;
            rc = write_l1_span(img, l1_offset, l1, first, last, 1, res, buf);
            if (rc == 1) {
                /* refused whole: entry by entry, as before */
                memcpy(l1 + first, old, (size_t)span * 8);
                rc = 0;
                for (uint32_t i = first; rc == 0 && i <= last; i++) {
                    if (!l1[i] || l1_entry_usable(img, l1[i], file_size))
                        continue;
                    old[0] = l1[i];
                    l1[i] = 0;
                    rc = write_l1_span(img, l1_offset, l1, i, i, 0, res, buf);
                    if (rc == 1) {
                        l1[i] = old[0];
                        ++*blocked;
                        rc = 0;
                        continue;
                    }
                    if (rc == 0 && active && i < img->l1_size)
                        img->l1[i] = 0;
                    if (rc == 0)
                        check_note(&st, QCOW2_FINDING_REPAIRED,
                                   l1_offset + (uint64_t)i * 8,
                                   "Repairing L1 entry %u of the table at "
                                   "0x%llx: %llx cleared (the L2 table "
                                   "cannot be followed)", i, ull(l1_offset),
                                   ull(old[0]));
                }
                continue;
            }
            for (uint32_t i = first; rc == 0 && i <= last; i++) {
                if (old[i - first] == l1[i])
                    continue;
                if (active && i < img->l1_size)
                    img->l1[i] = 0;
                check_note(&st, QCOW2_FINDING_REPAIRED,
                           l1_offset + (uint64_t)i * 8, "Repairing L1 "
                           "entry %u of the table at 0x%llx: %llx cleared "
                           "(the L2 table cannot be followed)", i,
                           ull(l1_offset), ull(old[i - first]));
            }
        }
    }
    free(l1);
    free(buf);
    return rc;
}

/* The first cluster past the file where new structures may go: past
 * the end of the snapshot table too, which, running past the end of the
 * file, is not counted yet claims its tail until step 4 replaces it (the
 * overlap check would refuse writes there; QEMU fills holes inside the
 * file instead, past the tail is just as safe). */
static uint64_t repair_fresh_start(const qcow2_image *img, uint64_t file_size)
{
    uint64_t cs = img->cluster_size, start = div_round_up(file_size, cs);

    if (img->nb_snapshots) {
        const qcow2_snapshot *last = &img->snapshots[img->nb_snapshots - 1];
        uint64_t table_end;
        if (!add_overflows(last->entry_offset, last->entry_length,
                           &table_end))
            start = max_u64(start, div_round_up(table_end, cs));
    }
    return start;
}

/* Clearing an entry turns what it referenced into leaks, which only the
 * refcount writes that follow can free: when a refcount block, or the
 * first cluster past the end of the file (where new ones would go), lies
 * inside other metadata (say a garbage snapshot L1 spanning the file),
 * those writes would be refused and the image left worse. 1 when so. */
static int refcounts_unwritable(qcow2_image *img, uint64_t file_size)
{
    uint64_t cs = img->cluster_size, end = div_round_up(file_size, cs) * cs;

    /* a block at or past the end of the file is never written: it is
     * "outside image", and the rebuild that replaces it writes past it */
    for (uint64_t i = 0; i < img->reftable_entries; i++) {
        uint64_t block = img->reftable[i] & REFT_OFFSET_MASK;
        if (block && block < end && is_aligned(block, cs) &&
            qcow2_overlap_find(img, OVERLAP_REFCOUNT_BLOCK, block, cs))
            return 1;
    }
    /* nor is a refcount block claiming the fresh start an obstacle: it
     * is outside the image too, and rebuild_refcounts guards the same */
    return qcow2_overlap_find(img, OVERLAP_REFCOUNT_BLOCK,
                              repair_fresh_start(img, file_size) * cs,
                              cs) != 0;
}

int repair_bad_entries(qcow2_image *img, qcow2_check_result *res,
                       uint64_t *blocked)
{
    uint64_t file_size;
    uint8_t *table;
    int rc;

    *blocked = 0;
    rc = img->io->ops->size(img->io, &file_size);
    if (rc < 0)
        return qcow2_fail(img, rc, "cannot get the size of the file");
    if (refcounts_unwritable(img, file_size)) {
        check_state st;
        note_state(&st, img, res);
        check_note(&st, QCOW2_FINDING_STRICT, 0, "Not clearing table "
                   "entries: the refcount updates that must follow would "
                   "overlap other metadata");
        ++*blocked;
        return 0;
    }
    table = malloc((size_t)img->cluster_size);
    if (!table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    rc = mend_l1(img, res, img->hdr.l1_table_offset, img->hdr.l1_size, 1,
                 file_size, table, blocked);
    for (uint32_t s = 0; rc == 0 && s < img->nb_snapshots; s++) {
        const qcow2_snapshot *sn = &img->snapshots[s];
        /* an unusable snapshot L1 stays as it is: reported, not guessed */
        if (!is_aligned(sn->l1_table_offset, img->cluster_size) ||
            sn->l1_size > QCOW2_MAX_L1_BYTES / 8 ||
            !range_inside(sn->l1_table_offset, (uint64_t)sn->l1_size * 8,
                          file_size))
            continue;
        rc = mend_l1(img, res, sn->l1_table_offset, sn->l1_size, 0,
                     file_size, table, blocked);
    }
    free(table);
    if (rc == 0)
        rc = qcow2_barrier(img);
    return rc;
}

/* ---- Step 2: refcounts ---------------------------------------------------- */

/* Store one refcount entry of any width (QEMU's packing, docs 4.2). */

int repair_needs_rebuild(check_state *st, int fix_errors)
{
    qcow2_image *img = st->img;

    for (uint64_t i = 0; i < img->reftable_entries; i++) {
        uint64_t raw = img->reftable[i], offset = raw & REFT_OFFSET_MASK;
        if (raw & REFT_RESERVED_MASK ||
            !is_aligned(offset, img->cluster_size))
            return 1;
        if (offset == 0)
            continue;
        /* a block outside the image is rebuilt under -r all (QEMU grows
         * the file instead); -r leaks leaves it alone, as QEMU does:
         * nothing a leak fix writes lies there (what it covers reads as
         * refcount 0, no leak) */
        if ((offset >> img->cluster_bits) >= st->nb_clusters) {
            if (fix_errors)
                return 1;
            continue;
        }
        if (st->counts[offset >> img->cluster_bits] != 1)
            return 1;
    }
    for (uint64_t i = 0; i < st->nb_clusters; i++) {
        uint64_t on_disk;
        if (st->counts[i] == 0)
            continue;
        if (check_disk_refcount(st, i, &on_disk) < 0 || on_disk == 0)
            return 1;
    }
    return 0;
}

/* Raise every refcount below its references (their blocks exist: the
 * refcount is not 0). */
static int raise_refcounts(check_state *st, qcow2_check_result *res)
{
    qcow2_image *img = st->img;
    check_state notes;

    note_state(&notes, img, res);
    for (uint64_t i = 0; i < st->nb_clusters; i++) {
        uint64_t on_disk;
        int rc;
        if (st->counts[i] == 0 || check_disk_refcount(st, i, &on_disk) < 0 ||
            on_disk >= st->counts[i])
            continue;
        rc = qcow2_refcount_update(img, i << img->cluster_bits,
                                   img->cluster_size,
                                   (int64_t)(st->counts[i] - on_disk));
        check_refblocks_forget(st);     /* the block changed */
        if (rc < 0)
            return rc;
        check_note(&notes, QCOW2_FINDING_REPAIRED, i << img->cluster_bits,
                   "Repairing cluster %llu refcount=%llu reference=%llu",
                   ull(i), ull(on_disk), ull(st->counts[i]));
    }
    return qcow2_barrier(img);
}

/*
 * QEMU's rebuild_refcount_structure: refcount blocks for the whole range
 * [0, end of the new structures) and a table for them, placed at the
 * first cluster past both the file and every counted reference, so
 * nothing in use (and nothing the old, untrusted structure claims) is
 * overwritten. Blocks, barrier, table, barrier, header pair.
 */
static int rebuild_refcounts(check_state *st, qcow2_check_result *res)
{
    qcow2_image *img = st->img;
    uint64_t cs = img->cluster_size, entries = img->refblock_entries;
    uint64_t start = max_u64(div_round_up(st->file_size, cs),
                             st->nb_clusters);
    uint64_t blocks = 0, table_clusters = 1, table_entries;
    uint64_t sn_first = 1, sn_last = 0, sn_end;
    uint64_t *reftable = NULL;
    uint8_t *buf = NULL;
    check_state notes;
    int rc = 0;

    note_state(&notes, img, res);
    start = max_u64(start, repair_fresh_start(img, st->file_size));
    /* A snapshot table running a cluster or more past the end of the file
     * was not counted (check_inc's rule); the new structures go past its
     * tail, so the file will cover it and every later check count it:
     * its clusters are counted here too, or they would read as
     * referenced at refcount 0 once the file has grown. */
    if (img->nb_snapshots &&
        !add_overflows(img->hdr.snapshots_offset,
                       qcow2_snapshot_table_size(img), &sn_end) &&
        sn_end >= st->file_size + cs &&
        div_round_up(sn_end, cs) <= start) {
        sn_first = img->hdr.snapshots_offset >> img->cluster_bits;
        sn_last = (sn_end - 1) >> img->cluster_bits;
    }
    /* fixed point: the new structures count themselves */
    for (;;) {
        uint64_t indices = div_round_up(start + blocks + table_clusters,
                                        entries);
        uint64_t needed_table = div_round_up(indices * 8, cs);
        if (indices == blocks && needed_table == table_clusters)
            break;
        blocks = indices;
        table_clusters = needed_table;
    }
    if (table_clusters * cs > QCOW2_MAX_REFTABLE_BYTES)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "the rebuilt refcount "
                          "table would need %llu clusters, more than QEMU "
                          "allows", ull(table_clusters));
    table_entries = table_clusters * cs / 8;
    buf = malloc((size_t)(table_clusters * cs > cs ? table_clusters * cs
                                                   : cs));
    reftable = calloc((size_t)table_entries, sizeof *reftable);
    if (!buf || !reftable) {
        free(buf);
        free(reftable);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    /* Structures past the end of the file are not counted, yet they
     * claim their range: writing over one would be refused half way
     * (and mark the image corrupt). Refuse first, having written nothing. */
    if (qcow2_overlap_find(img, OVERLAP_REFCOUNT_BLOCK |
                           OVERLAP_REFCOUNT_TABLE, start * cs,
                           (blocks + table_clusters) * cs)) {
        free(buf);
        free(reftable);
        return qcow2_fail(img, QCOW2_E_CORRUPT, "cannot rebuild the "
                          "refcount structure at 0x%llx: metadata past the "
                          "end of the file claims that range",
                          ull(start * cs));
    }
    check_note(&notes, QCOW2_FINDING_REPAIRED, start * cs,
               "Rebuilding refcount structure: %llu refcount blocks and a "
               "%llu-cluster refcount table at 0x%llx", ull(blocks),
               ull(table_clusters), ull(start * cs));

    for (uint64_t b = 0; rc == 0 && b < blocks; b++) {
        memset(buf, 0, (size_t)cs);
        for (uint64_t e = 0; e < entries; e++) {
            uint64_t cluster = b * entries + e, value = 0;
            if (cluster < st->nb_clusters)
                value = st->counts[cluster];
            if (cluster >= start &&
                cluster < start + blocks + table_clusters)
                value++;
            if (cluster >= sn_first && cluster <= sn_last)
                value++;
            if (value > st->count_max)
                value = st->count_max;
            if (value)
                img->refcount_codec->set(buf, e, value);
        }
        reftable[b] = (start + b) * cs;
        /* the old structure may claim these clusters: it is being
         * replaced, so only the other structures are guarded */
        rc = qcow2_write_checked(img, OVERLAP_REFCOUNT_BLOCK |
                                 OVERLAP_REFCOUNT_TABLE, "refcount_block",
                                 reftable[b], buf, (size_t)cs);
    }
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0) {
        memset(buf, 0, (size_t)(table_clusters * cs));
        for (uint64_t b = 0; b < blocks; b++)
            put_be64(buf + b * 8, reftable[b]);
        rc = qcow2_write_checked(img, OVERLAP_REFCOUNT_BLOCK |
                                 OVERLAP_REFCOUNT_TABLE, "refcount_table",
                                 (start + blocks) * cs, buf,
                                 (size_t)(table_clusters * cs));
    }
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_reftable(img, (start + blocks) * cs,
                                       (uint32_t)table_clusters);
    /* The old structure's blocks are gone (or were overwritten): drop
     * every cached refcount block, switched or not (refcount_cache.c). */
    qcow2_refcount_cache_drop_all(img);
    free(buf);
    if (rc < 0) {
        free(reftable);
        return rc;
    }
    free(img->reftable);
    img->reftable = reftable;
    img->reftable_entries = table_entries;
    img->ws->free_cluster_hint = 0;
    img->ws->free_byte_offset = 0;
    return 0;
}

int repair_refcounts(qcow2_image *img, qcow2_check_result *res)
{
    qcow2_check_result scratch;
    check_state st;
    int rc;

    memset(&scratch, 0, sizeof scratch);
    rc = check_count_references(img, &st, &scratch);
    if (rc == 0)
        rc = repair_needs_rebuild(&st, 1) ? rebuild_refcounts(&st, res)
                                : raise_refcounts(&st, res);
    check_state_release(&st);
    qcow2_check_result_free(&scratch);
    return rc;
}

/* ---- Step 3: COPIED flags ------------------------------------------------- */

/* COPIED exactly when the refcount on disk is 1 (always with a data file,
 * never on compressed entries). *want gets the entry as it should be. */
static int copied_entry(qcow2_image *img, uint64_t entry, uint64_t offset,
                        int has_data_file, uint64_t *want)
{
    uint64_t refcount = 1;
    int rc = 0;

    *want = entry;
    if (!has_data_file)
        rc = qcow2_refcount_get(img, offset >> img->cluster_bits, &refcount);
    if (rc < 0)
        return rc;
    *want = refcount == 1 ? entry | QCOW_OFLAG_COPIED
                          : entry & ~QCOW_OFLAG_COPIED;
    return 0;
}

int repair_copied(qcow2_image *img, qcow2_check_result *res)
{
    uint32_t entry_bytes = img->l2_entry_bytes;
    int has_data_file = qcow2_has_data_file(img), rc = 0;
    uint8_t *table = malloc((size_t)img->cluster_size);
    check_state st;

    note_state(&st, img, res);
    if (!table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint32_t i = 0; rc == 0 && i < img->l1_size; i++) {
        uint64_t entry = img->l1[i], l2_offset = entry & L1E_OFFSET_MASK;
        uint64_t want;
        int changed = 0, blocked;

        if (l2_offset == 0)
            continue;
        if (copied_entry(img, entry, l2_offset, 0, &want) < 0)
            want = entry;
        if (want != entry &&
            !write_blocked(img, res, OVERLAP_ACTIVE_L1,
                           img->hdr.l1_table_offset + (uint64_t)i * 8, 8,
                           "L1 entry")) {
            uint8_t bytes[8];
            put_be64(bytes, want);
            rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L1, "l1",
                                     img->hdr.l1_table_offset +
                                     (uint64_t)i * 8, bytes, sizeof bytes);
            if (rc < 0)
                break;
            img->l1[i] = want;
            res->corruptions_fixed++;
            check_note(&st, QCOW2_FINDING_REPAIRED,
                       img->hdr.l1_table_offset + (uint64_t)i * 8,
                       "Repairing OFLAG_COPIED L2 cluster: l1_index=%u "
                       "l1_entry=%llx -> %llx", i, ull(entry), ull(want));
        }
        if (rc == 0)
            rc = qcow2_read_meta(img, l2_offset, table, img->cluster_size,
                                 "L2 table");
        blocked = qcow2_overlap_find(img, OVERLAP_ACTIVE_L2, l2_offset,
                                     img->cluster_size) != 0;
        for (uint64_t j = 0; rc == 0 && j < img->l2_entries; j++) {
            uint64_t l2_entry = be64(table + j * entry_bytes);
            uint64_t data = l2_entry & L2E_OFFSET_MASK;
            int zero = (l2_entry & QCOW_OFLAG_ZERO) && !img->extended_l2;

            if (l2_entry & QCOW_OFLAG_COMPRESSED)
                continue;
            if (data == 0 && (zero || !has_data_file ||
                              !(l2_entry & QCOW_OFLAG_COPIED)))
                continue;
            /* a refcount that cannot be read leaves the flag as it is
             * (QEMU's check_oflag_copied skips it too) */
            if (copied_entry(img, l2_entry, data, has_data_file, &want) < 0 ||
                want == l2_entry)
                continue;
            changed++;
            if (blocked)
                continue;
            put_be64(table + j * entry_bytes, want);
            check_note(&st, QCOW2_FINDING_REPAIRED,
                       l2_offset + j * entry_bytes, "Repairing OFLAG_COPIED "
                       "data cluster: l2_entry=%llx -> %llx", ull(l2_entry),
                       ull(want));
        }
        if (rc == 0 && changed && blocked)
            (void)write_blocked(img, res, OVERLAP_ACTIVE_L2, l2_offset,
                                img->cluster_size, "L2 table");
        else if (rc == 0 && changed) {
            rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2, "l2", l2_offset,
                                     table, img->cluster_size);
            qcow2_l2_cache_drop(img->l2_cache, l2_offset);
            if (rc == 0)
                res->corruptions_fixed += (uint64_t)changed;
        }
    }
    free(table);
    if (rc == 0)
        rc = qcow2_barrier(img);
    return rc;
}

/* ---- Step 4: the snapshot table ------------------------------------------- */

/* Clusters of [offset, offset + length) that the check counted: a table
 * reaching one cluster or more past the end of the file was not counted
 * at all (check_inc's rule), so it has no refcount of its own to drop.
 * file_size is the file's size when the refcounts were counted: the
 * rebuild grows the file, and a table that now fits was still never
 * counted (freeing it would drop the refcounts of whatever its garbage
 * tail covers, the new table's cluster included). */
static int free_old_table(qcow2_image *img, uint64_t offset, uint64_t length,
                          uint64_t file_size)
{
    uint64_t end;
    int rc = 0;

    if (length == 0 || add_overflows(offset, length, &end) ||
        end >= check_file_length(file_size) + img->cluster_size)
        return 0;
    for (uint64_t c = offset >> img->cluster_bits;
         rc == 0 && c <= (end - 1) >> img->cluster_bits; c++) {
        uint64_t refcount;
        rc = qcow2_refcount_get(img, c, &refcount);
        if (rc == 0 && refcount > 0)
            rc = qcow2_free_clusters(img, c << img->cluster_bits,
                                     img->cluster_size);
    }
    return rc;
}

int repair_snapshot_table(qcow2_image *img, qcow2_check_result *res,
                          uint64_t counted_file_size)
{
    uint32_t count = img->nb_snapshots;
    uint64_t old_offset = img->hdr.snapshots_offset, old_length = 0;
    uint64_t size = 0, offset = 0, file_size;
    qcow2_snapshot **list;
    uint8_t *table = NULL;
    check_state notes;
    int rc;

    note_state(&notes, img, res);
    if (count) {
        const qcow2_snapshot *last = &img->snapshots[count - 1];
        old_length = last->entry_offset + last->entry_length - old_offset;
    }
    list = calloc((size_t)count + 1, sizeof *list);
    if (!list)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint32_t i = 0; i < count; i++)
        list[i] = &img->snapshots[i];
    rc = qcow2_snapshot_table_build(img, list, count, &table, &size);
    free(list);
    /* the new table first, synced; then the header; the old table is
     * freed only once nothing points at it */
    if (rc == 0 && count)
        rc = qcow2_alloc_clusters(img, div_round_up(size, img->cluster_size),
                                  &offset);
    if (rc == 0 && count)
        /* the old table may run past the end of the file over the
         * clusters just allocated: it is the one being replaced */
        rc = qcow2_write_checked(img, OVERLAP_SNAPSHOT_TABLE,
                                 "snapshot_table", offset, table,
                                 (size_t)size);
    free(table);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = qcow2_header_set_snapshots(img, offset, count);
    if (rc < 0)
        return rc;
    check_note(&notes, QCOW2_FINDING_REPAIRED, offset, "Repairing snapshot "
               "table: %u complete entries written at 0x%llx", count,
               ull(offset));
    rc = free_old_table(img, old_offset, old_length, counted_file_size);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        return rc;
    /* the parsed copy follows the table now on disk (and the file, which
     * grew, bounds it) */
    rc = img->io->ops->size(img->io, &file_size);
    if (rc < 0)
        return qcow2_fail(img, rc, "cannot get the size of the file");
    img->file_size = file_size;
    qcow2_snapshots_free(img);
    img->snapshot_extra_dropped = 0;
    return qcow2_snapshots_load(img);
}
