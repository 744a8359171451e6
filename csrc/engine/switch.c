/*
 * Whole-state switches: an operation that changes the active L1, the
 * refcounts and the snapshot table together (snapshot create, apply,
 * delete) takes effect with ONE header write.
 *
 * Header bytes 36..71 hold (l1_size, l1_table_offset), (refcount_table_
 * offset, refcount_table_clusters) and (nb_snapshots, snapshots_offset):
 * one 36-byte write inside one sector switches all three. So:
 *
 *   1. qcow2_switch_begin counts the references of every structure as
 *      they are now (the check walk, check_walk.c) into sw->counts, minus
 *      the refcount structure itself (it is replaced);
 *   2. the caller edits the counts (structures dropped, trees added) and
 *      writes every new structure at fresh clusters past the end of the
 *      file and past every reference: unreferenced, refcount 0 in the old
 *      structure;
 *   3. qcow2_switch_commit writes a new refcount structure holding exactly
 *      the new counts (itself included) after them, barrier, the 36 (or
 *      48, with the virtual size) header bytes in one synced write, then
 *      reloads the in-memory state.
 *
 * Before the header write the old state is intact; after it the new state
 * is exact: no leaks, no corruption, COPIED bits matching, at any cut.
 */
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* ---- The header ---------------------------------------------------------- */

/* Bytes [36, 72), or [24, 72) with the virtual size (crypt_method
 * rewritten as it is), in one synced write inside sector 0. */
static int header_switch(qcow2_image *img, int with_size, uint64_t size,
                         uint64_t l1_offset, uint32_t l1_size,
                         uint64_t reftable_offset, uint32_t reftable_clusters,
                         uint64_t snapshots_offset, uint32_t nb_snapshots)
{
    uint8_t bytes[48];
    uint8_t *p = bytes + 12;
    int rc;

    put_be64(bytes, size);              /* 24 (with_size only) */
    put_be32(bytes + 8, img->hdr.crypt_method);     /* 32, unchanged */
    put_be32(p, l1_size);               /* 36 */
    put_be64(p + 4, l1_offset);         /* 40 */
    put_be64(p + 12, reftable_offset);  /* 48 */
    put_be32(p + 20, reftable_clusters);/* 56 */
    put_be32(p + 24, nb_snapshots);     /* 60 */
    put_be64(p + 28, snapshots_offset); /* 64 */
    if (with_size)
        rc = qcow2_write_checked(img, OVERLAP_HEADER, "header", 24,
                                 bytes, sizeof bytes);
    else
        rc = qcow2_write_checked(img, OVERLAP_HEADER, "header", 36, p, 36);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        return rc;
    if (with_size)
        img->hdr.size = size;
    img->hdr.l1_size = l1_size;
    img->hdr.l1_table_offset = l1_offset;
    img->hdr.refcount_table_offset = reftable_offset;
    img->hdr.refcount_table_clusters = reftable_clusters;
    img->hdr.nb_snapshots = nb_snapshots;
    img->hdr.snapshots_offset = snapshots_offset;
    return 0;
}

int qcow2_header_switch_all(qcow2_image *img, uint64_t l1_offset,
                            uint32_t l1_size, uint64_t reftable_offset,
                            uint32_t reftable_clusters,
                            uint64_t snapshots_offset, uint32_t nb_snapshots)
{
    return header_switch(img, 0, 0, l1_offset, l1_size, reftable_offset,
                         reftable_clusters, snapshots_offset, nb_snapshots);
}

/* ---- Counts ----------------------------------------------------------------- */

static int ensure(qcow2_switch *sw, uint64_t clusters)
{
    uint64_t capacity = sw->capacity ? sw->capacity : 16;
    uint64_t *counts;

    if (clusters <= sw->capacity)
        return 0;
    while (capacity < clusters)
        capacity *= 2;
    counts = realloc(sw->counts, (size_t)capacity * sizeof *counts);
    if (!counts)
        return qcow2_fail(sw->img, QCOW2_E_NOMEM, "out of memory for the "
                          "reference counts of %llu clusters",
                          ull(capacity));
    memset(counts + sw->capacity, 0,
           (size_t)(capacity - sw->capacity) * sizeof *counts);
    sw->counts = counts;
    sw->capacity = capacity;
    return 0;
}

int qcow2_switch_add(qcow2_switch *sw, uint64_t offset, uint64_t length,
                     int64_t delta)
{
    qcow2_image *img = sw->img;
    uint64_t first, last;
    int rc;

    if (length == 0 || delta == 0)
        return 0;
    first = offset >> img->cluster_bits;
    last = (offset + length - 1) >> img->cluster_bits;
    rc = ensure(sw, last + 1);
    if (rc < 0)
        return rc;
    if (last + 1 > sw->nb_clusters)
        sw->nb_clusters = last + 1;
    for (uint64_t k = first; k <= last; k++) {
        if (delta < 0 && sw->counts[k] < (uint64_t)-delta)
            return qcow2_fail(img, QCOW2_E_CORRUPT, "refcount of cluster "
                              "%llu would drop below zero (references=%llu)",
                              ull(k), ull(sw->counts[k]));
        sw->counts[k] += (uint64_t)delta;
    }
    return 0;
}

int qcow2_switch_alloc(qcow2_switch *sw, uint64_t clusters, uint64_t *offset)
{
    int rc;

    *offset = sw->next << sw->img->cluster_bits;
    if (clusters == 0)
        return 0;
    rc = qcow2_switch_add(sw, *offset, clusters << sw->img->cluster_bits, 1);
    if (rc == 0)
        sw->next += clusters;
    return rc;
}

int qcow2_switch_begin(qcow2_image *img, qcow2_switch *sw)
{
    qcow2_check_result scratch;
    check_state st;
    int rc;

    memset(sw, 0, sizeof *sw);
    sw->img = img;
    memset(&scratch, 0, sizeof scratch);
    rc = check_count_references(img, &st, &scratch);
    if (rc == 0 && (scratch.corruptions || scratch.check_errors))
        rc = qcow2_fail(img, QCOW2_E_CORRUPT, "the image has %llu "
                        "corruptions and %llu check errors: repair it "
                        "first (check -r all)", ull(scratch.corruptions),
                        ull(scratch.check_errors));
    if (rc == 0) {
        sw->old_file_size = st.file_size;
        sw->nb_clusters = max_u64(div_round_up(st.file_size,
                                               img->cluster_size),
                                  st.nb_clusters);
        rc = ensure(sw, sw->nb_clusters + 1);
    }
    if (rc == 0) {
        for (uint64_t k = 0; k < st.nb_clusters; k++)
            sw->counts[k] = st.counts[k];
        sw->next = sw->nb_clusters;
    }
    check_state_release(&st);
    qcow2_check_result_free(&scratch);
    /* The refcount structure is replaced as a whole. */
    if (rc == 0)
        rc = qcow2_switch_add(sw, img->hdr.refcount_table_offset,
                              (uint64_t)img->hdr.refcount_table_clusters <<
                              img->cluster_bits, -1);
    for (uint64_t i = 0; rc == 0 && i < img->reftable_entries; i++) {
        uint64_t offset = img->reftable[i] & REFT_OFFSET_MASK;
        if (offset)
            rc = qcow2_switch_add(sw, offset, img->cluster_size, -1);
    }
    if (rc < 0)
        qcow2_switch_end(sw);
    return rc;
}

void qcow2_switch_end(qcow2_switch *sw)
{
    /* Not switched: what was written past the old end goes (best effort;
     * it was unreferenced and at refcount 0 anyway). */
    if (sw->img && !sw->switched && sw->next > div_round_up(
            sw->old_file_size, sw->img->cluster_size)) {
        uint64_t size;
        if (sw->img->io->ops->size(sw->img->io, &size) == 0 &&
            size > sw->old_file_size)
            (void)sw->img->io->ops->truncate(sw->img->io,
                                             sw->old_file_size);
    }
    free(sw->counts);
    memset(sw, 0, sizeof *sw);
}

/* ---- Trees ------------------------------------------------------------------------ */

/* Host range a compressed entry's stream touches (check_walk.c's). */
static void compressed_range(const qcow2_image *img, uint64_t entry,
                             uint64_t *offset, uint64_t *length)
{
    uint32_t shift = 62 - (img->cluster_bits - 8);
    uint64_t mask = (1ull << (img->cluster_bits - 8)) - 1;
    uint64_t coffset = entry & ((1ull << shift) - 1);
    uint64_t sectors = ((entry >> shift) & mask) + 1;

    *offset = coffset;
    *length = sectors * 512 - (coffset & 511);
}

static int read_l2(qcow2_switch *sw, uint64_t l1_entry, uint8_t *table,
                   uint64_t *l2_offset)
{
    qcow2_image *img = sw->img;

    *l2_offset = l1_entry & L1E_OFFSET_MASK;
    if (l1_entry & L1E_RESERVED_MASK)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "L1 entry 0x%016llx has "
                          "reserved bits set", ull(l1_entry));
    if (!is_aligned(*l2_offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT, "L2 table offset 0x%llx "
                          "is not cluster aligned", ull(*l2_offset));
    return qcow2_read_meta(img, *l2_offset, table, img->cluster_size,
                           "L2 table");
}

/* delta on every cluster the entries of one table reference. */
static int table_data(qcow2_switch *sw, const uint8_t *table, int64_t delta)
{
    qcow2_image *img = sw->img;
    int rc = 0;

    for (uint64_t i = 0; rc == 0 && i < img->l2_entries; i++) {
        uint64_t entry = be64(table + i * img->l2_entry_bytes);
        uint64_t host = entry & L2E_OFFSET_MASK, offset, length;

        if (entry & QCOW_OFLAG_COMPRESSED) {
            compressed_range(img, entry, &offset, &length);
            rc = qcow2_switch_add(sw, offset, length, delta);
        } else if (host) {
            if (!is_aligned(host, img->cluster_size))
                return qcow2_fail(img, QCOW2_E_CORRUPT, "L2 entry 0x%llx "
                                  "is not cluster aligned", ull(entry));
            rc = qcow2_switch_add(sw, host, img->cluster_size, delta);
        }
    }
    return rc;
}

int qcow2_switch_tree(qcow2_switch *sw, const uint64_t *l1, uint32_t l1_size,
                      int64_t delta)
{
    qcow2_image *img = sw->img;
    uint8_t *table = malloc((size_t)img->cluster_size);
    uint64_t l2_offset;
    int rc = table ? 0 : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");

    for (uint32_t i = 0; rc == 0 && i < l1_size; i++) {
        if (!(l1[i] & L1E_OFFSET_MASK))
            continue;
        rc = read_l2(sw, l1[i], table, &l2_offset);
        if (rc == 0)
            rc = table_data(sw, table, delta);
        if (rc == 0)
            rc = qcow2_switch_add(sw, l2_offset, img->cluster_size, delta);
    }
    free(table);
    return rc;
}

/* The entry as the new counts say (QEMU: COPIED exactly on normal and
 * zero-alloc entries of refcount 1, never on compressed ones). */
static uint64_t want_entry(const qcow2_switch *sw, uint64_t entry)
{
    uint64_t host = entry & L2E_OFFSET_MASK;
    uint64_t cluster = host >> sw->img->cluster_bits;

    entry &= ~QCOW_OFLAG_COPIED;
    if (!(entry & QCOW_OFLAG_COMPRESSED) && host &&
        cluster < sw->nb_clusters && sw->counts[cluster] == 1)
        entry |= QCOW_OFLAG_COPIED;
    return entry;
}

int qcow2_switch_active_tree(qcow2_switch *sw, uint64_t *l1, uint32_t l1_size)
{
    qcow2_image *img = sw->img;
    uint8_t *table = malloc((size_t)img->cluster_size);
    uint64_t l2_offset, copy;
    int rc = table ? 0 : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");

    /* The data first: the COPIED bits depend on every final count. */
    for (uint32_t i = 0; rc == 0 && i < l1_size; i++) {
        if (!(l1[i] & L1E_OFFSET_MASK))
            continue;
        rc = read_l2(sw, l1[i], table, &l2_offset);
        if (rc == 0)
            rc = table_data(sw, table, 1);
    }
    /* A table whose bits are right is shared; otherwise the active L1
     * gets a fresh copy with them fixed, the old one stays as it was for
     * whoever else holds it. */
    for (uint32_t i = 0; rc == 0 && i < l1_size; i++) {
        int changed = 0;

        if (!(l1[i] & L1E_OFFSET_MASK))
            continue;
        rc = read_l2(sw, l1[i], table, &l2_offset);
        for (uint64_t j = 0; rc == 0 && j < img->l2_entries; j++) {
            uint8_t *p = table + j * img->l2_entry_bytes;
            uint64_t want = want_entry(sw, be64(p));
            if (want != be64(p)) {
                put_be64(p, want);
                changed = 1;
            }
        }
        if (rc < 0)
            break;
        if (!changed) {
            rc = qcow2_switch_add(sw, l2_offset, img->cluster_size, 1);
            l1[i] = l2_offset;
            continue;
        }
        rc = qcow2_switch_alloc(sw, 1, &copy);
        if (rc == 0)
            rc = qcow2_write_checked(img, 0, "l2", copy, table,
                                     (size_t)img->cluster_size);
        l1[i] = copy;
    }
    free(table);
    /* L1 COPIED from the tables' final counts. */
    for (uint32_t i = 0; rc == 0 && i < l1_size; i++) {
        uint64_t cluster = (l1[i] & L1E_OFFSET_MASK) >> img->cluster_bits;
        if (cluster && sw->counts[cluster] == 1)
            l1[i] |= QCOW_OFLAG_COPIED;
    }
    return rc;
}

int qcow2_switch_write_l1(qcow2_switch *sw, const uint64_t *l1,
                          uint32_t l1_size, uint64_t *offset)
{
    qcow2_image *img = sw->img;
    size_t bytes = (size_t)l1_size * 8;
    uint8_t *table;
    int rc;

    if (bytes == 0) {
        *offset = img->hdr.l1_table_offset;
        return 0;
    }
    table = malloc(bytes);
    if (!table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint32_t i = 0; i < l1_size; i++)
        put_be64(table + 8ull * i, l1[i]);
    rc = qcow2_switch_alloc(sw, div_round_up(bytes, img->cluster_size),
                            offset);
    if (rc == 0)
        rc = qcow2_write_checked(img, 0, "l1", *offset, table, bytes);
    free(table);
    return rc;
}

/* ---- The refcount structure ---------------------------------------------------- */


/*
 * Refcount blocks covering [0, end of the new structures) at sw->next,
 * the table right after them; the fixed point counts them too. Every
 * count is checked against the width's maximum before anything is
 * written. *table_offset, *table_clusters and *reftable (host order,
 * table_clusters * cluster_size / 8 entries) describe the result.
 */
static int write_refcounts(qcow2_switch *sw, uint64_t *table_offset,
                           uint32_t *table_clusters, uint64_t **reftable)
{
    qcow2_image *img = sw->img;
    uint64_t cs = img->cluster_size, per_block = img->refblock_entries;
    uint64_t max = img->refcount_codec->max;
    uint64_t start = sw->next, blocks = 0, tclusters = 1, entries, offset;
    uint64_t *table = NULL;
    uint8_t *buf = NULL;
    int rc = 0;

    for (uint64_t k = 0; k < sw->nb_clusters; k++)
        if (sw->counts[k] > max)
            return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "refcount of cluster "
                              "%llu would exceed the %u-bit maximum %llu",
                              ull(k), img->refcount_bits, ull(max));
    for (;;) {
        uint64_t need = div_round_up(start + blocks + tclusters, per_block);
        uint64_t need_table = div_round_up(need * 8, cs);
        if (need == blocks && need_table == tclusters)
            break;
        blocks = need;
        tclusters = need_table;
    }
    if (tclusters * cs > QCOW2_MAX_REFTABLE_BYTES)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "the refcount table "
                          "would need %llu clusters, more than QEMU allows",
                          ull(tclusters));
    rc = qcow2_switch_alloc(sw, blocks + tclusters, &offset);
    if (rc < 0)
        return rc;
    entries = tclusters * cs / 8;
    table = calloc((size_t)entries, sizeof *table);
    buf = malloc((size_t)(tclusters > 1 ? tclusters * cs : cs));
    if (!table || !buf) {
        free(table);
        free(buf);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    for (uint64_t b = 0; rc == 0 && b < blocks; b++) {
        memset(buf, 0, (size_t)cs);
        for (uint64_t e = 0; e < per_block; e++) {
            uint64_t k = b * per_block + e;
            if (k < sw->nb_clusters && sw->counts[k])
                img->refcount_codec->set(buf, e, sw->counts[k]);
        }
        table[b] = offset + b * cs;
        rc = qcow2_write_checked(img, 0, "refcount_block", table[b], buf,
                                 (size_t)cs);
    }
    if (rc == 0) {
        memset(buf, 0, (size_t)(tclusters * cs));
        for (uint64_t b = 0; b < blocks; b++)
            put_be64(buf + b * 8, table[b]);
        rc = qcow2_write_checked(img, 0, "refcount_table",
                                 offset + blocks * cs, buf,
                                 (size_t)(tclusters * cs));
    }
    free(buf);
    if (rc < 0) {
        free(table);
        return rc;
    }
    *table_offset = offset + blocks * cs;
    *table_clusters = (uint32_t)tclusters;
    *reftable = table;
    return 0;
}

int qcow2_switch_commit(qcow2_switch *sw, uint64_t l1_offset,
                        const uint64_t *l1, uint32_t l1_size,
                        uint64_t snapshots_offset, uint32_t nb_snapshots,
                        uint64_t size)
{
    qcow2_image *img = sw->img;
    uint64_t reftable_offset = 0, *reftable = NULL, *new_l1, file_size;
    uint32_t reftable_clusters = 0;
    int rc;

    new_l1 = malloc(((size_t)l1_size + 1) * sizeof *new_l1);
    if (!new_l1)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    memcpy(new_l1, l1, (size_t)l1_size * sizeof *new_l1);
    rc = write_refcounts(sw, &reftable_offset, &reftable_clusters,
                         &reftable);
    /* Everything new is on disk before the one write that refers to it. */
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0) {
        free(new_l1);
        free(reftable);
        return rc;
    }
    rc = header_switch(img, size != img->size, size, l1_offset, l1_size,
                       reftable_offset, reftable_clusters, snapshots_offset,
                       nb_snapshots);
    if (rc < 0) {
        free(new_l1);
        free(reftable);
        /* The header bytes may or may not have landed. */
        sw->switched = 1;
        return qcow2_poison(img, rc);
    }
    sw->switched = 1;
    free(img->l1);
    img->l1 = new_l1;
    img->l1_size = l1_size;
    img->size = size;
    free(img->reftable);
    img->reftable = reftable;
    img->reftable_entries = ((uint64_t)reftable_clusters << img->cluster_bits)
                            / 8;
    qcow2_refcount_cache_drop_all(img);
    qcow2_l2_cache_drop_all(img->l2_cache);
    if (img->codec)
        qcow2_codec_forget(img->codec);
    img->ws->free_cluster_hint = 0;
    img->ws->free_byte_offset = 0;
    if (img->io->ops->size(img->io, &file_size) == 0)
        img->file_size = file_size;
    qcow2_snapshots_free(img);
    rc = qcow2_snapshots_load(img);
    return rc < 0 ? qcow2_poison(img, rc) : 0;
}
