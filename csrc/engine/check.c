/*
 * qemu-img check (QEMU's qcow2_check_refcounts and friends, 7.2): the
 * driver, the in-memory refcount table, the comparison with the refcounts
 * on disk, the COPIED flags of the active tables, leak repair and the
 * findings list. The walk that counts references is check_walk.c.
 *
 * Read-only unless a repair is asked for: every read goes straight to the
 * image file (no cache is filled or trusted), short reads past the end of
 * the file read as zeroes as QEMU's block layer pads them.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* ---- Findings ------------------------------------------------------------- */

/*
 * The findings array holds room for findings_room(finding_count) entries:
 * every writer (add_finding, append_findings) keeps that invariant, and
 * keep_repairs only shrinks the count, which keeps it too. Room is
 * therefore derived, never stored next to a count that could drift.
 */
static size_t findings_room(size_t count)
{
    size_t room = 8;

    while (room < count)
        room *= 2;
    return room;
}

/* Room for `count` findings in res (count <= CHECK_MAX_FINDINGS). */
static int findings_reserve(qcow2_check_result *res, size_t count)
{
    qcow2_finding *grown;

    if (res->findings && findings_room(count) <=
                             findings_room(res->finding_count))
        return 0;
    grown = realloc(res->findings, findings_room(count) * sizeof *grown);
    if (!grown)
        return QCOW2_E_NOMEM;
    res->findings = grown;
    return 0;
}

static void add_finding(check_state *st, int kind, uint64_t offset,
                        const char *fmt, va_list ap)
{
    qcow2_check_result *res = st->res;
    qcow2_finding *slot;
    char text[QCOW2_ERRMSG_MAX];

    if (res->finding_count >= CHECK_MAX_FINDINGS ||
        findings_reserve(res, res->finding_count + 1) < 0) {
        res->findings_dropped++;
        return;
    }
    vsnprintf(text, sizeof text, fmt, ap);
    slot = &res->findings[res->finding_count];
    slot->message = strdup(text);
    if (!slot->message) {
        res->findings_dropped++;
        return;
    }
    slot->kind = kind;
    slot->offset = offset;
    slot->cluster = offset >> st->img->cluster_bits;
    res->finding_count++;
}

void check_note(check_state *st, int kind, uint64_t offset, const char *fmt,
                ...)
{
    va_list ap;

    va_start(ap, fmt);
    add_finding(st, kind, offset, fmt, ap);
    va_end(ap);
}

void check_corrupt(check_state *st, uint64_t offset, const char *fmt, ...)
{
    va_list ap;

    st->res->corruptions++;
    va_start(ap, fmt);
    add_finding(st, QCOW2_FINDING_CORRUPTION, offset, fmt, ap);
    va_end(ap);
}

/* ---- Reading ---------------------------------------------------------------- */

int check_pread(check_state *st, uint64_t offset, void *buf, size_t len,
                const char *what)
{
    qcow2_io *io = st->img->io;
    uint8_t *bytes = buf;
    char text[128];
    size_t done = 0;

    while (done < len) {
        uint64_t at;
        int64_t got;
        if (add_overflows(offset, done, &at) || at >= st->file_size)
            break;
        got = io->ops->pread(io, bytes + done, len - done, at);
        if (got < 0) {
            st->res->check_errors++;
            check_note(st, QCOW2_FINDING_CHECK_ERROR, offset,
                       "ERROR: I/O error reading the %s at 0x%llx: %s", what,
                       ull(offset),
                       qcow2_errno_text(io->last_errno ? io->last_errno : EIO,
                                        text, sizeof text));
            return (int)got;
        }
        if (got == 0)
            break;
        done += (size_t)got;
    }
    memset(bytes + done, 0, len - done);
    return 0;
}

/* ---- In-memory refcounts ------------------------------------------------------ */

int check_inc(check_state *st, uint64_t offset, uint64_t size)
{
    qcow2_image *img = st->img;
    uint64_t end, first, last;

    if (size == 0)
        return 0;
    /* The last cluster of an image may be half written, so a reference
     * may run past the end of the file, but by less than one cluster. */
    if (add_overflows(offset, size, &end) ||
        end >= st->file_size + img->cluster_size) {
        check_corrupt(st, offset, "ERROR: counting reference for region "
                      "exceeding the end of the file by one cluster or "
                      "more: offset 0x%llx size 0x%llx", ull(offset),
                      ull(size));
        return 0;
    }
    first = offset >> img->cluster_bits;
    last = (end - 1) >> img->cluster_bits;
    for (uint64_t k = first; k <= last; k++) {
        if (k >= st->capacity)      /* cannot happen: bounded above */
            return QCOW2_E_NOMEM;
        if (k >= st->nb_clusters)
            st->nb_clusters = k + 1;
        if (st->counts[k] >= st->count_max) {
            check_corrupt(st, k << img->cluster_bits, "ERROR: overflow "
                          "cluster offset=0x%llx",
                          ull(k << img->cluster_bits));
            continue;
        }
        st->counts[k]++;
    }
    return 0;
}

/* ---- Refcounts on disk ---------------------------------------------------------- */

int check_disk_refcount(check_state *st, uint64_t cluster, uint64_t *refcount)
{
    qcow2_image *img = st->img;
    uint64_t reftable_index = cluster / img->refblock_entries;
    uint64_t block_offset;
    int ret;

    *refcount = 0;
    if (st->refcounts_dead)
        return QCOW2_E_IO;
    if (reftable_index >= img->reftable_entries)
        return 0;
    block_offset = img->reftable[reftable_index] & REFT_OFFSET_MASK;
    if (block_offset == 0)
        return 0;
    if (!is_aligned(block_offset, img->cluster_size)) {
        /* QEMU signals a fatal corruption here and the node is unusable
         * from then on: every later refcount read fails too. */
        st->refcounts_dead = 1;
        return QCOW2_E_IO;
    }
    if (st->refblock_index != reftable_index) {
        st->refblock_index = UINT64_MAX;
        ret = check_pread(st, block_offset, st->refblock, img->cluster_size,
                          "refcount block");
        if (ret < 0)
            return ret;
        st->refblock_index = reftable_index;
    }
    *refcount = img->refcount_codec->get(st->refblock,
                                         cluster % img->refblock_entries);
    return 0;
}

/* ---- Comparison ---------------------------------------------------------------- */

/* QEMU's compare_refcounts; with repair "leaks", refcounts that are too
 * high are lowered through the write engine (never below the references). */
static int compare_refcounts(check_state *st, uint64_t *highest)
{
    qcow2_image *img = st->img;
    qcow2_check_result *res = st->res;
    char text[128];

    *highest = 0;
    for (uint64_t i = 0; i < st->nb_clusters; i++) {
        uint64_t on_disk, counted = st->counts[i];
        uint64_t offset = i << img->cluster_bits;

        if (check_disk_refcount(st, i, &on_disk) < 0) {
            res->check_errors++;
            check_note(st, QCOW2_FINDING_CHECK_ERROR, offset,
                       "Can't get refcount for cluster %llu: %s", ull(i),
                       qcow2_errno_text(EIO, text, sizeof text));
            continue;
        }
        if (on_disk > 0 || counted > 0)
            *highest = i;
        if (on_disk == counted)
            continue;
        if (on_disk > counted && st->repair >= QCOW2_REPAIR_LEAKS) {
            /* a 64-bit refcount may be more than one delta can lower */
            uint64_t excess = on_disk - counted;
            int ret = 0;
            while (ret == 0 && excess > 0) {
                uint64_t step = excess > (uint64_t)INT64_MAX
                                    ? (uint64_t)INT64_MAX : excess;
                ret = qcow2_refcount_update(img, offset, img->cluster_size,
                                            -(int64_t)step);
                excess -= step;
            }
            st->refblock_index = UINT64_MAX;    /* the block changed */
            if (ret == 0) {
                res->leaks_fixed++;
                check_note(st, QCOW2_FINDING_REPAIRED, offset,
                           "Repairing cluster %llu refcount=%llu "
                           "reference=%llu", ull(i), ull(on_disk),
                           ull(counted));
                continue;
            }
        }
        if (on_disk < counted) {
            check_corrupt(st, offset, "ERROR cluster %llu refcount=%llu "
                          "reference=%llu", ull(i), ull(on_disk),
                          ull(counted));
        } else {
            res->leaks++;
            check_note(st, QCOW2_FINDING_LEAK, offset, "Leaked cluster %llu "
                       "refcount=%llu reference=%llu", ull(i), ull(on_disk),
                       ull(counted));
        }
    }
    return 0;
}

/* ---- COPIED flags ----------------------------------------------------------------- */

/* QEMU's check_oflag_copied over the active tables: COPIED must be set
 * exactly when the refcount is 1. A refcount that cannot be read is
 * skipped without a word (compare_refcounts reported it already). */
/* The COPIED check against the counted references of the cluster at
 * host_offset instead of its on-disk refcount. */
static void count_copied_vs_counted(check_state *st, uint64_t host_offset,
                                    uint64_t entry)
{
    uint64_t cluster = host_offset >> st->img->cluster_bits;
    uint64_t counted = cluster < st->capacity ? st->counts[cluster] : 0;

    if ((counted == 1) != ((entry & QCOW_OFLAG_COPIED) != 0))
        st->copied_vs_counted++;
}

static int check_copied(check_state *st, uint8_t *table)
{
    qcow2_image *img = st->img;
    uint32_t entry_bytes = img->l2_entry_bytes;

    for (uint32_t i = 0; i < st->active_l1_size; i++) {
        uint64_t l1_entry = st->active_l1[i];
        uint64_t l2_offset = l1_entry & L1E_OFFSET_MASK;
        uint64_t refcount;

        if (l2_offset == 0)
            continue;
        if (check_disk_refcount(st, l2_offset >> img->cluster_bits,
                                &refcount) < 0)
            continue;
        count_copied_vs_counted(st, l2_offset, l1_entry);
        if ((refcount == 1) != ((l1_entry & QCOW_OFLAG_COPIED) != 0) &&
            ++st->copied_vs_disk)   /* count, then report */
            check_corrupt(st, img->hdr.l1_table_offset + (uint64_t)i * 8,
                          "ERROR OFLAG_COPIED L2 cluster: l1_index=%u "
                          "l1_entry=%llx refcount=%llu", i, ull(l1_entry),
                          ull(refcount));
        if (check_pread(st, l2_offset, table, img->cluster_size,
                        "L2 table") < 0)
            return QCOW2_E_IO;
        for (uint64_t j = 0; j < img->l2_entries; j++) {
            uint64_t l2_entry = be64(table + j * entry_bytes);
            uint64_t data_offset = l2_entry & L2E_OFFSET_MASK;
            int zero = (l2_entry & QCOW_OFLAG_ZERO) && !img->extended_l2;

            if (l2_entry & QCOW_OFLAG_COMPRESSED)
                continue;
            /* NORMAL or ZERO_ALLOC; offset 0 with COPIED is normal in a
             * data file */
            if (data_offset == 0 &&
                (zero || !st->has_data_file ||
                 !(l2_entry & QCOW_OFLAG_COPIED)))
                continue;
            if (st->has_data_file)
                refcount = 1;
            else if (check_disk_refcount(st, data_offset >> img->cluster_bits,
                                         &refcount) < 0)
                continue;
            if (!st->has_data_file)
                count_copied_vs_counted(st, data_offset, l2_entry);
            else if (!(l2_entry & QCOW_OFLAG_COPIED))
                st->copied_vs_counted++;
            if ((refcount == 1) != ((l2_entry & QCOW_OFLAG_COPIED) != 0) &&
                ++st->copied_vs_disk)
                check_corrupt(st, l2_offset + j * entry_bytes,
                              "ERROR OFLAG_COPIED data cluster: "
                              "l2_entry=%llx refcount=%llu", ull(l2_entry),
                              ull(refcount));
        }
    }
    return 0;
}

/* ---- Driver ------------------------------------------------------------------------- */

static int state_init(check_state *st, qcow2_image *img, int repair,
                      qcow2_check_result *res)
{
    uint64_t file_clusters;
    int ret;

    memset(st, 0, sizeof *st);
    st->img = img;
    st->res = res;
    st->repair = repair;
    st->refblock_index = UINT64_MAX;
    st->has_data_file =
        (img->hdr.incompatible_features & INCOMPAT_DATA_FILE) != 0;
    st->count_max = min_u64(img->refcount_codec->max, UINT32_MAX);

    ret = img->io->ops->size(img->io, &st->file_size);
    if (ret < 0)
        return qcow2_fail(img, ret, "cannot get the size of the file");
    st->file_size = check_file_length(st->file_size);
    file_clusters = div_round_up(st->file_size, img->cluster_size);
    if (file_clusters > CHECK_MAX_CLUSTERS)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "the file holds %llu "
                          "clusters, more than qemu-img checks (%llu)",
                          ull(file_clusters), ull(CHECK_MAX_CLUSTERS));
    st->nb_clusters = file_clusters;
    st->capacity = file_clusters + 1;
    st->counts = calloc((size_t)st->capacity, sizeof *st->counts);
    st->refblock = malloc((size_t)img->cluster_size);
    if (!st->counts || !st->refblock)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for the "
                          "reference counts of %llu clusters",
                          ull(st->capacity));
    return 0;
}

static void state_free(check_state *st)
{
    free(st->counts);
    free(st->refblock);
    free(st->active_l1);
}

int check_count_references(qcow2_image *img, check_state *st,
                           qcow2_check_result *scratch)
{
    int ret = state_init(st, img, QCOW2_REPAIR_NONE, scratch);

    if (ret == 0)
        ret = check_walk(st);
    return ret;
}

void check_state_release(check_state *st)
{
    state_free(st);
    memset(st, 0, sizeof *st);
}

/* One pass: qcow2_check_refcounts plus the snapshot table check. */
static int check_pass(qcow2_image *img, int repair, qcow2_check_result *res,
                      uint64_t *repair_pass_corruptions)
{
    check_state st;
    uint64_t highest = 0;
    uint8_t *table;
    int ret;

    memset(res, 0, sizeof *res);
    ret = state_init(&st, img, repair, res);
    if (ret < 0) {
        state_free(&st);
        return ret;
    }
    /* what a virtual disk of this size needs (QEMU counts whole sectors) */
    res->total_clusters = div_round_up(img->hdr.size / 512 * 512,
                                       img->cluster_size);
    ret = check_walk(&st);
    /* entries whose extra data was cut at a repair-mode open: QEMU counts
     * each as a corruption that -r all fixes by rewriting the table */
    for (uint32_t i = 0; ret == 0 && i < img->snapshot_extra_dropped; i++)
        check_corrupt(&st, img->hdr.snapshots_offset, "ERROR: snapshot table "
                      "entry has more than %u bytes of extra data",
                      QCOW2_MAX_SNAPSHOT_EXTRA);
    if (ret == 0 && repair == QCOW2_REPAIR_LEAKS &&
        repair_needs_rebuild(&st)) {
        /* QEMU's -r leaks: refcounts read through a structure that must be
         * rebuilt are not to be trusted, nor are the blocks a leak fix
         * would write: report, fix nothing */
        res->check_errors++;
        check_note(&st, QCOW2_FINDING_CHECK_ERROR, 0, "ERROR need to "
                   "rebuild refcount structures");
        st.repair = QCOW2_REPAIR_NONE;
    }
    if (ret == 0)
        ret = compare_refcounts(&st, &highest);
    if (ret == 0 && st.repair >= QCOW2_REPAIR_LEAKS &&
        res->check_errors == 0 &&
        res->corruptions == 0 && res->leaks == 0) {
        /* QEMU's check_oflag_copied under -r leaks: the refcounts are
         * exact now that the leaks are gone, so the COPIED flags are set
         * from them in the same pass (a flag left clear on a cluster whose
         * leaked second reference was just dropped is a corruption that
         * only this makes go away). */
        ret = repair_copied(img, res);
    } else if (ret == 0) {
        table = malloc((size_t)img->cluster_size);
        /* an I/O error in check_copied is counted in check_errors and
         * ends the pass there, as in QEMU */
        if (!table)
            ret = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        else
            (void)check_copied(&st, table);
        free(table);
    }
    if (ret == 0)
        ret = check_strict_tail(&st);
    res->image_end_offset = (highest + 1) << img->cluster_bits;
    /* What qemu-img -r all's own pass counts: its COPIED check runs after
     * the refcounts are fixed, so it compares with the counted references. */
    if (repair_pass_corruptions)
        *repair_pass_corruptions = res->corruptions - st.copied_vs_disk +
                                   st.copied_vs_counted +
                                   st.refblocks_outside;
    state_free(&st);
    if (ret == QCOW2_E_NOMEM && img->err.code == 0)
        qcow2_fail(img, ret, "out of memory during the check");
    return ret;
}

/* Move the findings of `from` to the end of `to` (as many as the cap
 * allows; the rest are counted as dropped). */
static void append_findings(qcow2_check_result *to, qcow2_check_result *from)
{
    size_t take = from->finding_count;

    if (to->finding_count + take > CHECK_MAX_FINDINGS)
        take = CHECK_MAX_FINDINGS - to->finding_count;
    if (take && findings_reserve(to, to->finding_count + take) < 0)
        take = 0;
    if (take)
        memcpy(to->findings + to->finding_count, from->findings,
               take * sizeof *to->findings);
    for (size_t i = take; i < from->finding_count; i++)
        free(from->findings[i].message);
    to->finding_count += take;
    to->findings_dropped += from->findings_dropped +
                            (from->finding_count - take);
    free(from->findings);
    from->findings = NULL;
    from->finding_count = 0;
    from->findings_dropped = 0;
}

/* A clean result after a repair marks the image clean and consistent, as
 * qemu-img check -r does (v3 only: v2 has no feature bits). */
static int mark_clean(qcow2_image *img)
{
    int ret = 0;

    if (img->hdr.version < 3)
        return 0;
    if (img->hdr.incompatible_features & INCOMPAT_DIRTY)
        ret = qcow2_header_set_feature(img, 0, 0, 0);
    if (ret == 0 && (img->hdr.incompatible_features & INCOMPAT_CORRUPT))
        ret = qcow2_header_set_feature(img, 0, 1, 0);
    return ret;
}

/* Keep only the findings of kind "repaired" (a pass whose problems were
 * already reported). */
static void keep_repairs(qcow2_check_result *res)
{
    size_t kept = 0;

    for (size_t i = 0; i < res->finding_count; i++) {
        if (res->findings[i].kind == QCOW2_FINDING_REPAIRED)
            res->findings[kept++] = res->findings[i];
        else
            free(res->findings[i].message);
    }
    res->finding_count = kept;
}

/* QEMU's qcow2_check_fix_snapshot_table: entries whose extra data was cut
 * at a repair-mode open, and v3 entries with less extra data than the
 * 16 bytes version 3 requires ("incomplete"), are mended by writing the
 * table again, every entry complete. */
static int snapshot_table_needs_rewrite(const qcow2_image *img)
{
    if (img->snapshot_extra_dropped)
        return 1;
    for (uint32_t i = 0; img->hdr.version >= 3 && i < img->nb_snapshots; i++)
        if (img->snapshots[i].extra_data_size < CHECK_SNAPSHOT_EXTRA_V3)
            return 1;
    return 0;
}

/* -r all on an image with corruptions: the three steps of repair.c, the
 * leaks they leave freed before the COPIED flags are set (a flag must
 * never claim refcount 1 while a leak still says 2). */
static int repair_all(qcow2_image *img, qcow2_check_result *out)
{
    qcow2_check_result leaks;
    int ret;

    if ((ret = repair_bad_entries(img, out)) < 0 ||
        (ret = repair_refcounts(img, out)) < 0)
        return ret;
    ret = check_pass(img, QCOW2_REPAIR_LEAKS, &leaks, NULL);
    if (ret < 0)
        return ret;
    keep_repairs(&leaks);
    append_findings(out, &leaks);
    qcow2_check_result_free(&leaks);
    if ((ret = repair_copied(img, out)) < 0)
        return ret;
    /* last, as QEMU fixes the snapshot table once the refcounts are right:
     * the new table is allocated from them */
    if (snapshot_table_needs_rewrite(img)) {
        if ((ret = repair_snapshot_table(img, out)) < 0)
            return ret;
        /* the old table, gone, may have run past the end of the file
         * over the rebuilt refcounts, counted then as referenced at
         * refcount 0 (which stops a leak pass): free now what it held
         * back, and set the COPIED flags those refcounts decide */
        if ((ret = check_pass(img, QCOW2_REPAIR_LEAKS, &leaks, NULL)) < 0)
            return ret;
        keep_repairs(&leaks);
        append_findings(out, &leaks);
        qcow2_check_result_free(&leaks);
        if ((ret = repair_copied(img, out)) < 0)
            return ret;
    }
    qcow2_l2_cache_drop_all(img->l2_cache);
    return qcow2_flush(img);
}

int qcow2_check(qcow2_image *img, int repair, qcow2_check_result *out)
{
    qcow2_check_result again;
    uint64_t corruptions_before = 0, leaks_before = 0;
    uint64_t repair_pass_corruptions = 0;
    int full_repair = 0;
    int ret;

    memset(out, 0, sizeof *out);
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED,
                          "a raw image has no check");
    if (img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "a snapshot view cannot be checked; check the "
                          "image it belongs to");
    if (repair < QCOW2_REPAIR_NONE || repair > QCOW2_REPAIR_ALL)
        return qcow2_fail(img, QCOW2_E_INVALID, "unknown repair mode %d",
                          repair);
    if (repair != QCOW2_REPAIR_NONE) {
        if ((ret = qcow2_check_writable(img)) < 0)
            return ret;
        if ((ret = qcow2_flush(img)) < 0)
            return ret;
    }

    if (repair == QCOW2_REPAIR_ALL) {
        /* look first: corruptions take the full repair, leaks alone the
         * leak repair, a clean image nothing at all (idempotence) */
        ret = check_pass(img, QCOW2_REPAIR_NONE, out, &repair_pass_corruptions);
        if (ret == 0 && out->corruptions == 0 && out->leaks != 0) {
            qcow2_check_result_free(out);
            ret = check_pass(img, QCOW2_REPAIR_LEAKS, out, NULL);
        } else if (ret == 0 && out->corruptions != 0) {
            full_repair = 1;
            corruptions_before = repair_pass_corruptions;
            leaks_before = out->leaks;
            ret = repair_all(img, out);
        }
    } else {
        ret = check_pass(img, repair, out, NULL);
    }
    if (ret < 0) {
        qcow2_check_result_free(out);
        return ret;
    }
    if (repair == QCOW2_REPAIR_NONE)
        return 0;

    if (full_repair || out->leaks_fixed || out->corruptions_fixed) {
        /* qemu-img double checks the fixed image and reports that, with
         * the numbers fixed by the first pass */
        if ((ret = qcow2_flush(img)) < 0 ||
            (ret = check_pass(img, QCOW2_REPAIR_NONE, &again, NULL)) < 0) {
            qcow2_check_result_free(out);
            return ret;
        }
        if (full_repair) {
            again.corruptions_fixed = corruptions_before > again.corruptions
                                          ? corruptions_before -
                                                again.corruptions
                                          : 0;
            again.leaks_fixed = leaks_before > again.leaks
                                    ? leaks_before - again.leaks : 0;
        } else {
            again.leaks_fixed = out->leaks_fixed;
            again.corruptions_fixed = out->corruptions_fixed;
        }
        append_findings(out, &again);
        again.findings = out->findings;
        again.finding_count = out->finding_count;
        again.findings_dropped = out->findings_dropped;
        *out = again;
    }
    if (out->check_errors == 0 && out->corruptions == 0) {
        ret = mark_clean(img);
        if (ret == 0)
            ret = qcow2_flush(img);
        if (ret < 0) {
            qcow2_check_result_free(out);
            return ret;
        }
    }
    return 0;
}

void qcow2_check_result_free(qcow2_check_result *res)
{
    if (!res)
        return;
    for (size_t i = 0; i < res->finding_count; i++)
        free(res->findings[i].message);
    free(res->findings);
    res->findings = NULL;
    res->finding_count = 0;
}
