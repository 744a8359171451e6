/*
 * qemu-img check (QEMU's qcow2_check_refcounts and friends, 7.2), the
 * driver: one pass (the walk, the comparison with the refcounts on disk,
 * the COPIED flags of the active tables, leak repair), the repair steps in
 * QEMU's order, the result. Calls go down: to the walk (check_walk.c),
 * the COPIED flags (check_copied.c) and the repair steps (repair.c), and
 * from all of them to the reads (check_read.c) and the shared state
 * (check_state.c: in-memory refcounts, findings).
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
            check_refblocks_forget(st);     /* the block changed */
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

/* ---- Driver ------------------------------------------------------------------------- */

/* One pass: qcow2_check_refcounts plus the snapshot table check. */
static int check_pass(qcow2_image *img, int repair, qcow2_check_result *res,
                      uint64_t *repair_pass_corruptions)
{
    check_state st;
    uint64_t highest = 0;
    int ret;

    memset(res, 0, sizeof *res);
    ret = check_state_init(&st, img, repair, res);
    if (ret < 0) {
        check_state_release(&st);
        return ret;
    }
    /* what a virtual disk of this size needs (QEMU counts whole sectors) */
    res->total_clusters = div_round_up(img->hdr.size / 512 * 512,
                                       img->cluster_size);
    /* the COPIED check in the walk, unless the counted references are
     * asked of it (-r all's first pass) or a repair changes refcounts */
    st.copied_in_walk = repair == QCOW2_REPAIR_NONE &&
                        !repair_pass_corruptions;
    ret = check_walk(&st);
    /* entries whose extra data was cut at a repair-mode open: QEMU counts
     * each as a corruption that -r all fixes by rewriting the table */
    for (uint32_t i = 0; ret == 0 && i < img->snapshot_extra_dropped; i++)
        check_corrupt(&st, img->hdr.snapshots_offset, "ERROR: snapshot table "
                      "entry has more than %u bytes of extra data",
                      QCOW2_MAX_SNAPSHOT_EXTRA);
    if (ret == 0 && repair == QCOW2_REPAIR_LEAKS &&
        repair_needs_rebuild(&st, 0)) {
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
        ret = check_copied(&st);
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
    check_state_release(&st);
    if (ret == QCOW2_E_NOMEM && img->err.code == 0)
        qcow2_fail(img, ret, "out of memory during the check");
    return ret;
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

/* A leak pass (its repairs kept in out), then the COPIED flags set from
 * the refcounts it leaves. */
static int free_leaks_then_copied(qcow2_image *img, qcow2_check_result *out)
{
    qcow2_check_result leaks;
    int ret = check_pass(img, QCOW2_REPAIR_LEAKS, &leaks, NULL);

    if (ret < 0)
        return ret;
    check_keep_repairs(&leaks);
    check_append_findings(out, &leaks);
    qcow2_check_result_free(&leaks);
    return repair_copied(img, out);
}

/* -r all on an image with corruptions: the three steps of repair.c, the
 * leaks they leave freed before the COPIED flags are set (a flag must
 * never claim refcount 1 while a leak still says 2). */
static int repair_all(qcow2_image *img, qcow2_check_result *out)
{
    uint64_t blocked = 0, counted_file_size;
    int ret;

    /* the size the refcounts are counted with (the rebuild grows it) */
    if ((ret = img->io->ops->size(img->io, &counted_file_size)) < 0)
        return qcow2_fail(img, ret, "cannot get the size of the file");
    if ((ret = repair_bad_entries(img, out, &blocked)) < 0 ||
        (ret = repair_refcounts(img, out)) < 0)
        return ret;
    /* a table entry whose clearing the old refcount structure stood in
     * the way of (an L2 table at the refcount table, say) is cleared now
     * that the structure may have moved; the leak pass below frees what
     * it held */
    if (blocked && (ret = repair_bad_entries(img, out, &blocked)) < 0)
        return ret;
    if ((ret = free_leaks_then_copied(img, out)) < 0)
        return ret;
    /* last, as QEMU fixes the snapshot table once the refcounts are right:
     * the new table is allocated from them */
    if (snapshot_table_needs_rewrite(img)) {
        if ((ret = repair_snapshot_table(img, out, counted_file_size)) < 0)
            return ret;
        /* the old table, gone, may have run past the end of the file
         * over the rebuilt refcounts, counted then as referenced at
         * refcount 0 (which stops a leak pass): free now what it held
         * back, and set the COPIED flags those refcounts decide */
        if ((ret = free_leaks_then_copied(img, out)) < 0)
            return ret;
    }
    qcow2_l2_cache_drop_all(img->l2_cache);
    return qcow2_flush(img);
}

static int check_run(qcow2_image *img, int repair, qcow2_check_result *out)
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
        check_append_findings(out, &again);
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

static int check_work(qcow2_image *img, int repair, qcow2_check_result *out)
{
    int ret;

    /* a repair writes once per bad entry, leak or refcount: each overlap
     * check then searches sorted offsets rather than scan whole tables */
    if (repair != QCOW2_REPAIR_NONE)
        qcow2_overlap_index_hold(img);
    ret = check_run(img, repair, out);
    if (repair != QCOW2_REPAIR_NONE)
        qcow2_overlap_index_release(img);
    return ret;
}

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_check(qcow2_image *img, int repair, qcow2_check_result *out)
{
    QCOW2_HELD(img, check_work(img, repair, out));
}
