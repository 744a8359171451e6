/*
 * Internal snapshots, the writing side (QEMU 7.2's qcow2-snapshot.c:
 * qcow2_snapshot_create, _goto, _delete, qcow2_write_snapshots,
 * qcow2_update_snapshot_refcount; qcow2.c's save/load_vmstate).
 *
 * Every operation takes effect with ONE header write (switch.c): the new
 * state is computed in memory (the references of every cluster counted,
 * the COPIED bits recomputed from them), every new structure (L2 copies
 * whose COPIED bits change, the active L1, the snapshot table, a whole
 * new refcount structure) is written at fresh clusters past the end of
 * the file, synced, and then header bytes 36..71 switch the active L1,
 * the refcount table and the snapshot table together (bytes 24..71 when
 * apply changes the virtual size).
 *   create  the old active L1 and its tables become the snapshot's; the
 *           active L1 is a new table whose L2 tables are shared, or fresh
 *           copies with COPIED cleared where the refcount becomes 2.
 *   apply   the active L1 is a new table holding the snapshot's tables
 *           (copied where COPIED must change); the old tree's clusters
 *           are counted 0 in the new structure.
 *   delete  the snapshot table without the entry; the snapshot's tree is
 *           counted 0; active tables whose clusters drop to refcount 1
 *           are copied with COPIED set.
 * A cut anywhere leaves either the old state or the new one, each exact:
 * qemu-img check finds no corruption and no leak. What becomes
 * unreferenced is simply at refcount 0 in the new structure.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ops.h"

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

static uint64_t l1_coverage(const qcow2_image *img)
{
    return 1ull << (img->cluster_bits + img->l2_bits);
}

/* QEMU's qcow2_vm_state_offset: the first L1 entry mapping no guest data. */
static uint64_t vm_state_offset(const qcow2_image *img)
{
    return div_round_up(img->size, l1_coverage(img)) *
           l1_coverage(img);
}

/* The file grew under us: views and reloads check tables against it. */
static void refresh_file_size(qcow2_image *img)
{
    uint64_t size;

    if (img->io->ops->size(img->io, &size) == 0)
        img->file_size = size;
}

static int common_checks(qcow2_image *img, const char *what)
{
    int rc = qcow2_begin_update(img);

    if (rc < 0)
        return rc;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "cannot %s: a raw image "
                          "has no snapshots", what);
    if (qcow2_has_data_file(img))
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "cannot %s: internal "
                          "snapshots are not supported with an external "
                          "data file", what);
    return 0;
}

/* ---- The snapshot table ------------------------------------------------- */

/*
 * QEMU's qcow2_write_snapshots: the table (encoded by snapshot_table.c)
 * at fresh clusters, written, not synced; the old table's clusters
 * uncounted. *offset is 0 for an empty table.
 */
static int write_table(qcow2_switch *sw, qcow2_snapshot *const *list,
                       uint32_t count, uint64_t *offset)
{
    qcow2_image *img = sw->img;
    uint64_t size = 0;
    uint8_t *table = NULL;
    int rc = qcow2_snapshot_table_build(img, list, count, &table, &size);

    *offset = 0;
    if (rc == 0)
        rc = qcow2_switch_add(sw, img->hdr.snapshots_offset,
                              qcow2_snapshot_table_size(img), -1);
    if (rc == 0 && count)
        rc = qcow2_switch_alloc(sw, div_round_up(size, img->cluster_size),
                                offset);
    if (rc == 0 && count)
        rc = qcow2_write_checked(img, 0, "snapshot_table", *offset, table,
                                 (size_t)size);
    free(table);
    return rc;
}

/* ---- Lookup ---------------------------------------------------------------- */

static int find_snapshot(const qcow2_image *img, const char *key, int by_id)
{
    for (uint32_t i = 0; i < img->nb_snapshots; i++)
        if (strcmp(by_id ? img->snapshots[i].id : img->snapshots[i].name,
                   key) == 0)
            return (int)i;
    return -1;
}

/* QEMU's find_new_snapshot_id: decimal max(numeric ids) + 1. */
static void new_snapshot_id(const qcow2_image *img, char *id, size_t length)
{
    unsigned long max = 0;

    for (uint32_t i = 0; i < img->nb_snapshots; i++) {
        unsigned long value = strtoul(img->snapshots[i].id, NULL, 10);
        if (value > max)
            max = value;
    }
    snprintf(id, length, "%lu", max + 1);
}

/* ---- VM state ------------------------------------------------------------ */

/* QEMU's non-exact L1 growth (the guest write path's). */
static int grow_l1_for(qcow2_image *img, uint64_t end)
{
    uint64_t needed = div_round_up(end, l1_coverage(img));
    uint64_t size = img->l1_size ? img->l1_size : 1;

    if (needed <= img->l1_size)
        return 0;
    while (size < needed)
        size = div_round_up(size * 3, 2);
    return qcow2_l1_grow(img, size);
}

static int vmstate_area_check(qcow2_image *img)
{
    if (img->is_raw || img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "no VM state area in a "
                          "%s", img->is_raw ? "raw image" : "snapshot view");
    return 0;
}

/* Guest I/O at the VM-state area: the public calls' range limit is the
 * virtual size, here it is what the L1 table covers. */
static int vmstate_io(qcow2_image *img, uint64_t pos, void *buf,
                      size_t length, int writing)
{
    uint64_t start, end, saved = img->size;
    int rc = vmstate_area_check(img);

    if (rc < 0)
        return rc;
    if (add_overflows(vm_state_offset(img), pos, &start) ||
        add_overflows(start, length, &end) || end > QCOW2_MAX_HOST_OFFSET)
        return qcow2_fail(img, QCOW2_E_INVALID, "VM state range at %llu "
                          "(%zu bytes) is too large", ull(pos), length);
    if (length == 0)
        return 0;
    if (writing) {
        rc = common_checks(img, "save the VM state");
        if (rc == 0)
            rc = grow_l1_for(img, end);
        if (rc < 0)
            return rc;
    }
    img->size = max_u64(saved, end);
    rc = writing ? qcow2_write(img, start, buf, length)
                 : qcow2_read(img, start, buf, length);
    img->size = saved;
    return rc;
}

int qcow2_vmstate_save(qcow2_image *img, uint64_t pos, const void *buf,
                       size_t length)
{
    return vmstate_io(img, pos, (void *)buf, length, 1);
}

int qcow2_vmstate_load(qcow2_image *img, uint64_t pos, void *buf,
                       size_t length)
{
    return vmstate_io(img, pos, buf, length, 0);
}

/* ---- Where the VM state ends ------------------------------------------- */

/* End (guest offset, cluster aligned) of the last cluster of [from, to),
 * one L2 table's range, that is allocated (has a host cluster, compressed
 * or not: QEMU's qcow2_cluster_is_allocated); 0 when none is. A zero
 * cluster without one is what a discard leaves, not VM state. */
static int last_cluster_end(qcow2_image *img, uint64_t from, uint64_t to,
                            uint64_t *end)
{
    *end = 0;
    while (from < to) {
        qcow2_run run;
        int rc = qcow2_lookup_run(img, from, to - from, &run);

        if (rc < 0)
            return rc;
        if (sc_type_has_host(run.type) || run.type == SC_COMPRESSED)
            *end = align_up(from + run.length, img->cluster_size);
        from += run.length;
    }
    return 0;
}

static int compare_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return (x > y) - (x < y);
}

static uint64_t l1_key(const qcow2_image *img, uint64_t index)
{
    return img->l1[index] & (L1E_OFFSET_MASK | L1E_RESERVED_MASK);
}

/*
 * The L1 entries of the area, distinct, sorted, each with a flag "its
 * table was searched and is empty": a hostile L1 may point millions of
 * entries at a few empty tables, and each table is searched once, so the
 * work stays bounded by the file, not by l1_size x entries per table.
 */
typedef struct {
    uint64_t *keys;
    uint8_t *empty;
    size_t count;
} table_memo;

static int memo_build(qcow2_image *img, uint64_t first, table_memo *memo)
{
    size_t n = 0;

    memset(memo, 0, sizeof *memo);
    for (uint64_t i = first; i < img->l1_size; i++)
        n += l1_key(img, i) != 0;
    if (n == 0)
        return 0;
    memo->keys = malloc(n * sizeof *memo->keys);
    memo->empty = calloc(n, 1);
    if (!memo->keys || !memo->empty) {
        free(memo->keys);
        free(memo->empty);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory scanning the "
                          "VM state area");
    }
    for (uint64_t i = first; i < img->l1_size; i++)
        if (l1_key(img, i))
            memo->keys[memo->count++] = l1_key(img, i);
    qsort(memo->keys, memo->count, sizeof *memo->keys, compare_u64);
    return 0;
}

static uint8_t *memo_flag(table_memo *memo, uint64_t key)
{
    uint64_t *at = bsearch(&key, memo->keys, memo->count, sizeof key,
                           compare_u64);

    return memo->empty + (at - memo->keys);
}

int qcow2_vmstate_size(qcow2_image *img, uint64_t *size)
{
    uint64_t start, coverage, first;
    table_memo memo;
    int rc = vmstate_area_check(img);

    *size = 0;
    if (rc < 0)
        return rc;
    start = vm_state_offset(img);
    coverage = l1_coverage(img);
    first = start / coverage;
    rc = memo_build(img, first, &memo);
    /* Backwards: the first table holding anything is the last one. */
    for (uint64_t i = img->l1_size; rc == 0 && i-- > first;) {
        uint64_t end = 0, from = max_u64(i * coverage, start);
        uint8_t *searched_empty;

        if (l1_key(img, i) == 0)
            continue;
        searched_empty = memo_flag(&memo, l1_key(img, i));
        if (*searched_empty)
            continue;
        rc = last_cluster_end(img, from, (i + 1) * coverage, &end);
        if (rc == 0 && end) {
            *size = end - start;
            break;
        }
        *searched_empty = 1;
    }
    free(memo.keys);
    free(memo.empty);
    return rc;
}

/* QEMU drops the VM state from the active L1 once the snapshot holds it
 * (qcow2_cluster_discard, not a full discard). Failures only cost space. */
static void discard_vmstate(qcow2_image *img, uint64_t length)
{
    uint64_t start = vm_state_offset(img), saved = img->size;
    uint64_t end = start + align_up(length, img->cluster_size);

    img->size = end;
    (void)qcow2_discard(img, start, end - start);
    img->size = saved;
}

/* ---- Create ------------------------------------------------------------------ */

void qcow2_snapshot_create_opts_init(qcow2_snapshot_create_opts *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->icount = 0;   /* what qemu-img writes for an offline snapshot */
}

static int create_checks(qcow2_image *img, const char *name)
{
    int rc = common_checks(img, "create a snapshot");

    if (rc < 0)
        return rc;
    if (img->refcount_bits == 1)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "cannot create a "
                          "snapshot: refcount_bits=1 cannot count a cluster "
                          "shared by two snapshots");
    if (img->nb_snapshots >= QCOW2_MAX_SNAPSHOTS)
        return qcow2_fail(img, QCOW2_E_INVALID, "cannot create a snapshot: "
                          "the image already has %u snapshots",
                          img->nb_snapshots);
    if (strlen(name) > 0xffff)
        return qcow2_fail(img, QCOW2_E_INVALID, "snapshot name of %zu bytes "
                          "is too long (max 65535)", strlen(name));
    if (find_snapshot(img, name, 0) >= 0 || find_snapshot(img, name, 1) >= 0)
        return qcow2_fail(img, QCOW2_E_EXISTS, "a snapshot named or "
                          "numbered '%s' already exists", name);
    return 0;
}

/* A copy of the active L1 at fresh clusters, synced. */
static void now(uint32_t *sec, uint32_t *nsec)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    *sec = (uint32_t)ts.tv_sec;
    /* qemu-img takes g_get_real_time(): microseconds */
    *nsec = (uint32_t)(ts.tv_nsec / 1000 * 1000);
}

static int snapshot_create_work(qcow2_image *img, const char *name,
                                const qcow2_snapshot_create_opts *opts,
                                uint32_t *index)
{
    qcow2_snapshot_create_opts defaults;
    qcow2_snapshot sn, **list = NULL;
    qcow2_switch sw;
    char id[32];
    uint64_t *l1 = NULL, l1_offset = 0, table_offset = 0;
    uint32_t count = img->nb_snapshots + 1;
    int rc;

    if (!opts) {
        qcow2_snapshot_create_opts_init(&defaults);
        opts = &defaults;
    }
    rc = create_checks(img, name);
    if (rc < 0)
        return rc;
    if (opts->vm_state_size) {
        rc = qcow2_vmstate_save(img, 0, opts->vm_state, opts->vm_state_size);
        if (rc < 0)
            return rc;
    }
    memset(&sn, 0, sizeof sn);
    new_snapshot_id(img, id, sizeof id);
    sn.id = id;
    sn.name = (char *)name;
    if (opts->has_date) {
        sn.date_sec = opts->date_sec;
        sn.date_nsec = opts->date_nsec;
    } else {
        now(&sn.date_sec, &sn.date_nsec);
    }
    sn.vm_clock_nsec = opts->vm_clock_nsec;
    sn.vm_state_size = opts->vm_state_size;
    sn.has_disk_size = 1;
    sn.disk_size = img->size;
    sn.icount = opts->icount;
    sn.l1_size = img->l1_size;
    /* The active L1 as it lies becomes the snapshot's (still counted). */
    sn.l1_table_offset = img->l1_size ? img->hdr.l1_table_offset : 0;
    count = img->nb_snapshots + 1;

    l1 = malloc(((size_t)img->l1_size + 1) * sizeof *l1);
    list = malloc((size_t)count * sizeof *list);
    if (!l1 || !list) {
        free(l1);
        free(list);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    memcpy(l1, img->l1, (size_t)img->l1_size * sizeof *l1);
    for (uint32_t i = 0; i < img->nb_snapshots; i++)
        list[i] = &img->snapshots[i];
    list[img->nb_snapshots] = &sn;
    rc = qcow2_switch_begin(img, &sw);
    if (rc == 0) {
        /* A second reference to the whole tree, from a new active L1. */
        rc = qcow2_switch_active_tree(&sw, l1, img->l1_size);
        if (rc == 0)
            rc = qcow2_switch_write_l1(&sw, l1, img->l1_size, &l1_offset);
        if (rc == 0)
            rc = write_table(&sw, list, count, &table_offset);
        if (rc == 0)
            rc = qcow2_switch_commit(&sw, l1_offset, l1, img->l1_size,
                                     table_offset, count, img->size);
        qcow2_switch_end(&sw);
    }
    free(l1);
    free(list);
    if (rc < 0)
        return rc;
    if (opts->vm_state_size)
        discard_vmstate(img, opts->vm_state_size);
    if (index)
        *index = img->nb_snapshots - 1;
    return 0;
}

/* ---- Apply -------------------------------------------------------------- */

/* The snapshot's L1 table, validated as QEMU's qcow2_validate_table. */
static int load_snapshot_l1(qcow2_image *img, const qcow2_snapshot *sn,
                            uint64_t **l1)
{
    int rc;

    *l1 = NULL;
    if (sn->l1_size > QCOW2_MAX_L1_BYTES / 8)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "snapshot '%s': L1 table of "
                          "%u entries is too large", sn->name, sn->l1_size);
    refresh_file_size(img);
    rc = qcow2_check_table(img, "snapshot L1 table", sn->l1_table_offset,
                           (uint64_t)sn->l1_size * 8);
    if (rc < 0)
        return rc;
    if (sn->l1_size == 0) {
        *l1 = calloc(1, sizeof **l1);
        return *l1 ? 0 : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    return qcow2_l1_load(img, sn->l1_table_offset, sn->l1_size,
                         "snapshot L1 table", l1);
}

static int snapshot_apply_work(qcow2_image *img, uint32_t index)
{
    const qcow2_snapshot *sn;
    uint64_t *sn_l1 = NULL, *l1 = NULL, size, needed, entries, l1_offset;
    qcow2_switch sw;
    int rc = common_checks(img, "apply a snapshot");

    if (rc < 0)
        return rc;
    if (index >= img->nb_snapshots)
        return qcow2_fail(img, QCOW2_E_NOTFOUND, "snapshot index %u out of "
                          "range (%u snapshots)", index, img->nb_snapshots);
    sn = &img->snapshots[index];
    size = sn->has_disk_size ? sn->disk_size : img->size;
    if (size != img->size && img->hdr.version < 3)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Can't resize a v2 "
                          "image which has snapshots");
    if (qcow2_l1_entries_needed(img, size, &needed) < 0)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "snapshot '%s': disk size "
                          "%llu is too large", sn->name, ull(size));
    /* QEMU: truncate to the snapshot's size, then grow to its L1 size
     * (the active L1 never shrinks). */
    entries = max_u64(max_u64(needed, sn->l1_size), img->l1_size);
    if (entries > QCOW2_MAX_L1_BYTES / 8)
        return qcow2_fail(img, QCOW2_E_INVALID, "The image size is too large "
                          "for file format 'qcow2' (try using a larger "
                          "cluster size)");
    rc = load_snapshot_l1(img, sn, &sn_l1);
    if (rc < 0)
        return rc;
    l1 = calloc(entries ? (size_t)entries : 1, sizeof *l1);
    if (!l1) {
        free(sn_l1);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    memcpy(l1, sn_l1, (size_t)sn->l1_size * sizeof *l1);
    rc = qcow2_switch_begin(img, &sw);
    if (rc == 0) {
        /* The old active tree and its L1 are no longer referenced. */
        rc = qcow2_switch_tree(&sw, img->l1, img->l1_size, -1);
        if (rc == 0)
            rc = qcow2_switch_add(&sw, img->hdr.l1_table_offset,
                                  (uint64_t)img->l1_size * 8, -1);
        if (rc == 0)
            rc = qcow2_switch_active_tree(&sw, l1, (uint32_t)entries);
        if (rc == 0)
            rc = qcow2_switch_write_l1(&sw, l1, (uint32_t)entries,
                                       &l1_offset);
        if (rc == 0)
            rc = qcow2_switch_commit(&sw, l1_offset, l1, (uint32_t)entries,
                                     img->hdr.snapshots_offset,
                                     img->nb_snapshots, size);
        qcow2_switch_end(&sw);
    }
    free(sn_l1);
    free(l1);
    return rc;
}

/* ---- Delete ------------------------------------------------------------- */

static int snapshot_delete_work(qcow2_image *img, uint32_t index)
{
    qcow2_snapshot **list;
    qcow2_switch sw;
    uint64_t *sn_l1 = NULL, *l1, l1_offset, table_offset = 0;
    uint32_t count = 0;
    int rc = common_checks(img, "delete a snapshot");

    if (rc < 0)
        return rc;
    if (index >= img->nb_snapshots)
        return qcow2_fail(img, QCOW2_E_NOTFOUND, "snapshot index %u out of "
                          "range (%u snapshots)", index, img->nb_snapshots);
    rc = load_snapshot_l1(img, &img->snapshots[index], &sn_l1);
    if (rc < 0)
        return rc;
    list = malloc(((size_t)img->nb_snapshots + 1) * sizeof *list);
    l1 = malloc(((size_t)img->l1_size + 1) * sizeof *l1);
    if (!list || !l1) {
        free(sn_l1);
        free(list);
        free(l1);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < img->nb_snapshots; i++)
        if (i != index)
            list[count++] = &img->snapshots[i];
    memcpy(l1, img->l1, (size_t)img->l1_size * sizeof *l1);
    l1_offset = img->hdr.l1_table_offset;
    rc = qcow2_switch_begin(img, &sw);
    if (rc == 0) {
        const qcow2_snapshot *sn = &img->snapshots[index];
        rc = qcow2_switch_tree(&sw, sn_l1, sn->l1_size, -1);
        if (rc == 0)
            rc = qcow2_switch_add(&sw, sn->l1_table_offset,
                                  (uint64_t)sn->l1_size * 8, -1);
        /* The active tree counted afresh: COPIED where refcounts drop to
         * 1 (changed tables are copied, the L1 with them). */
        if (rc == 0)
            rc = qcow2_switch_tree(&sw, img->l1, img->l1_size, -1);
        if (rc == 0)
            rc = qcow2_switch_active_tree(&sw, l1, img->l1_size);
        if (rc == 0 && memcmp(l1, img->l1, (size_t)img->l1_size * 8)) {
            rc = qcow2_switch_add(&sw, img->hdr.l1_table_offset,
                                  (uint64_t)img->l1_size * 8, -1);
            if (rc == 0)
                rc = qcow2_switch_write_l1(&sw, l1, img->l1_size,
                                           &l1_offset);
        }
        if (rc == 0)
            rc = write_table(&sw, list, count, &table_offset);
        if (rc == 0)
            rc = qcow2_switch_commit(&sw, l1_offset, l1, img->l1_size,
                                     table_offset, count, img->size);
        qcow2_switch_end(&sw);
    }
    free(list);
    free(l1);
    free(sn_l1);
    return rc;
}

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_snapshot_create(qcow2_image *img, const char *name,
                          const qcow2_snapshot_create_opts *opts,
                          uint32_t *index)
{
    QCOW2_HELD(img, snapshot_create_work(img, name, opts, index));
}

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_snapshot_apply(qcow2_image *img, uint32_t index)
{
    QCOW2_HELD(img, snapshot_apply_work(img, index));
}

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_snapshot_delete(qcow2_image *img, uint32_t index)
{
    QCOW2_HELD(img, snapshot_delete_work(img, index));
}
