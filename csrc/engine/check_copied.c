/*
 * qemu-img check, the COPIED flags (QEMU's check_oflag_copied over the
 * active tables): COPIED must be set exactly when the refcount on disk is
 * 1. A refcount that cannot be read is skipped without a word
 * (compare_refcounts reported it already).
 *
 * QEMU checks them in a pass of its own after compare_refcounts, reading
 * every active L2 table a second time. When nothing asks for the check
 * against the counted references (only -r all's first pass does), the
 * walk does it instead, table by table as it reads them (check_walk.c),
 * with quiet refcount reads and its findings set aside; check_copied then
 * appends them where QEMU reports them. The first refcount that cannot be
 * read quietly (an unaligned block, a read error), or refcounts that
 * compare_refcounts found unreadable for good, give that up: the pass of
 * its own then runs as QEMU's does, so findings and counts are the same
 * either way.
 */
#include <string.h>

#include "check.h"

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

/* 0 and the refcount, or 1: not readable (in the walk: given up). */
static int copied_refcount(check_state *st, uint64_t cluster,
                           uint64_t *refcount)
{
    if (!st->copied_in_walk)
        return check_disk_refcount(st, cluster, refcount) < 0;
    if (check_disk_refcount_quiet(st, cluster, refcount) == 0)
        return 0;
    st->copied_given_up = 1;
    return 1;
}

/* A mismatch: counted, then reported (set aside in the walk). */
static void copied_mismatch(check_state *st, uint64_t offset,
                            const char *what, uint32_t l1_index,
                            uint64_t entry, uint64_t refcount)
{
    qcow2_check_result *res = st->res;

    st->copied_vs_disk++;
    if (st->copied_in_walk)
        st->res = &st->copied_aside;
    if (what)
        check_corrupt(st, offset, "ERROR OFLAG_COPIED L2 cluster: "
                      "l1_index=%u l1_entry=%llx refcount=%llu", l1_index,
                      ull(entry), ull(refcount));
    else
        check_corrupt(st, offset, "ERROR OFLAG_COPIED data cluster: "
                      "l2_entry=%llx refcount=%llu", ull(entry),
                      ull(refcount));
    st->res = res;
}

int check_copied_l1(check_state *st, uint32_t i, uint64_t l1_entry)
{
    qcow2_image *img = st->img;
    uint64_t l2_offset = l1_entry & L1E_OFFSET_MASK;
    uint64_t refcount;

    if (st->copied_given_up ||
        copied_refcount(st, l2_offset >> img->cluster_bits, &refcount))
        return 0;
    if (!st->copied_in_walk)
        count_copied_vs_counted(st, l2_offset, l1_entry);
    if ((refcount == 1) != ((l1_entry & QCOW_OFLAG_COPIED) != 0))
        copied_mismatch(st, img->hdr.l1_table_offset + (uint64_t)i * 8,
                        "L2", i, l1_entry, refcount);
    return 1;
}

void check_copied_l2(check_state *st, uint64_t l2_offset, uint64_t j,
                     uint64_t l2_entry)
{
    qcow2_image *img = st->img;
    uint64_t data_offset = l2_entry & L2E_OFFSET_MASK, refcount;
    int zero = (l2_entry & QCOW_OFLAG_ZERO) && !img->extended_l2;

    if (l2_entry & QCOW_OFLAG_COMPRESSED)
        return;
    /* NORMAL or ZERO_ALLOC; offset 0 with COPIED is normal in a data
     * file */
    if (data_offset == 0 &&
        (zero || !st->has_data_file || !(l2_entry & QCOW_OFLAG_COPIED)))
        return;
    if (st->copied_given_up)
        return;
    if (st->has_data_file)
        refcount = 1;
    else if (copied_refcount(st, data_offset >> img->cluster_bits,
                             &refcount))
        return;
    if (st->copied_in_walk)
        ;   /* the counted references are not complete yet: not asked */
    else if (!st->has_data_file)
        count_copied_vs_counted(st, data_offset, l2_entry);
    else if (!(l2_entry & QCOW_OFLAG_COPIED))
        st->copied_vs_counted++;
    if ((refcount == 1) != ((l2_entry & QCOW_OFLAG_COPIED) != 0))
        copied_mismatch(st, l2_offset + j * img->l2_entry_bytes, NULL, 0,
                        l2_entry, refcount);
}

/* The pass of its own: every active L2 table read again. */
static int copied_pass(check_state *st, check_tables *tables)
{
    qcow2_image *img = st->img;
    uint32_t entry_bytes = img->l2_entry_bytes;

    for (uint32_t i = 0; i < st->active_l1_size; i++) {
        uint64_t l2_offset = st->active_l1[i] & L1E_OFFSET_MASK;
        uint8_t *table;

        if (l2_offset == 0 || !check_copied_l1(st, i, st->active_l1[i]))
            continue;
        if (check_tables_get(tables, i, &table) < 0)
            return QCOW2_E_IO;
        for (uint64_t j = 0; j < img->l2_entries; j++) {
            uint64_t l2_entry;

            /* eight unused entries: nothing to compare */
            if ((j & 7) == 0 && j + 8 <= img->l2_entries &&
                check_bytes_zero(table + j * entry_bytes,
                                 8 * (size_t)entry_bytes)) {
                j += 7;
                continue;
            }
            l2_entry = be64(table + j * entry_bytes);
            if (l2_entry != 0)
                check_copied_l2(st, l2_offset, j, l2_entry);
        }
    }
    return 0;
}

int check_copied(check_state *st)
{
    check_tables tables;
    int ret;

    if (st->copied_in_walk && !st->copied_given_up &&
        !st->refcounts_dead && st->active_l1) {
        /* what the pass would have found, in its order */
        st->res->corruptions += st->copied_aside.corruptions;
        check_append_findings(st->res, &st->copied_aside);
        st->copied_in_walk = 0;
        return 0;
    }
    qcow2_check_result_free(&st->copied_aside);
    memset(&st->copied_aside, 0, sizeof st->copied_aside);
    st->copied_in_walk = 0;
    st->copied_given_up = 0;
    /* refcounts unreadable for good: QEMU's pass skips every entry (and
     * reads no table); no active L1 (the walk stopped in it): nothing */
    if (st->refcounts_dead)
        return 0;
    if (check_tables_open(&tables, st, st->active_l1, st->active_l1_size,
                          0) < 0) {
        check_tables_close(&tables);
        return qcow2_fail(st->img, QCOW2_E_NOMEM, "out of memory");
    }
    /* an I/O error is counted in check_errors and ends the pass there,
     * as in QEMU */
    ret = copied_pass(st, &tables);
    check_tables_close(&tables);
    return ret == QCOW2_E_IO ? 0 : ret;
}
