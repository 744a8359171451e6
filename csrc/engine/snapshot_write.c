/*
 * Internal snapshots, the writing side (QEMU 7.2's qcow2-snapshot.c:
 * qcow2_snapshot_create, _goto, _delete, qcow2_write_snapshots,
 * qcow2_update_snapshot_refcount; qcow2.c's save/load_vmstate).
 *
 * Crash-safe order (docs/qcow2-format.md 5.4, 10.2):
 *   create  snapshot L1 copy written at fresh clusters, synced -> +1 on
 *           every L2 table and cluster the active L1 reaches, synced ->
 *           COPIED cleared in the active L2 tables, synced -> active L1
 *           (synced) -> new snapshot table at fresh clusters, synced ->
 *           header pair switched (one synced write) -> old table freed.
 *   apply   active L1 grown -> +1 on everything the snapshot L1 reaches
 *           (COPIED recomputed in its tables), synced -> active L1
 *           overwritten (synced) -> size -> -1 on the old active tree ->
 *           COPIED recomputed in the active tables.
 *   delete  table rewritten without the entry (header switch) -> -1 on
 *           the snapshot's tree -> its L1 freed -> COPIED recomputed.
 * A crash leaves leaked clusters (refcounts too high), never a reference
 * to a cluster whose refcount is too low. QEMU's layout has no atomic way
 * to change a refcount and the COPIED bit that mirrors it, so a crash in
 * the middle of a walk can leave COPIED bits qemu-img check flags (and
 * `check -r all` fixes), as QEMU itself leaves them.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "write.h"

#define SNAPSHOT_HEADER_BYTES   40
#define SNAPSHOT_EXTRA_BYTES    24  /* vm_state_size, disk_size, icount */

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

/* ---- Refcount walks ------------------------------------------------------ */

/* Host range a compressed L2 entry's stream occupies (its sectors). */
static void compressed_range(const qcow2_image *img, uint64_t entry,
                             uint64_t *offset, uint64_t *length)
{
    uint32_t x = 70 - img->cluster_bits;
    uint64_t coffset = entry & ((1ull << x) - 1);
    uint64_t sectors = ((entry >> x) &
                        ((1ull << (img->cluster_bits - 8)) - 1)) + 1;

    *offset = coffset & ~511ull;
    *length = sectors * 512;
}

/* Contiguous normal clusters are updated with one call. */
typedef struct run_acc {
    uint64_t start, length;
} run_acc;

static int run_flush(qcow2_image *img, run_acc *run, int64_t addend)
{
    int rc = 0;

    if (run->length)
        rc = qcow2_refcount_update(img, run->start, run->length, addend);
    run->length = 0;
    return rc;
}

static int run_add(qcow2_image *img, run_acc *run, uint64_t host,
                   int64_t addend)
{
    int rc = 0;

    if (run->length && run->start + run->length == host) {
        run->length += img->cluster_size;
        return 0;
    }
    rc = run_flush(img, run, addend);
    run->start = host;
    run->length = img->cluster_size;
    return rc;
}

/* COPIED of one L2 entry as the refcounts now say (QEMU: set exactly on
 * normal and zero-alloc entries of refcount 1). *entry is updated. */
static int fix_entry_copied(qcow2_image *img, uint64_t *entry)
{
    uint64_t old = *entry, host = old & L2E_OFFSET_MASK, refcount = 0;
    int rc;

    *entry = old & ~QCOW_OFLAG_COPIED;
    if ((old & QCOW_OFLAG_COMPRESSED) || host == 0)
        return 0;
    rc = qcow2_refcount_get(img, host >> img->cluster_bits, &refcount);
    if (rc < 0)
        return rc;
    if (refcount == 1)
        *entry |= QCOW_OFLAG_COPIED;
    return 0;
}

/*
 * QEMU's qcow2_update_snapshot_refcount for one L2 table: addend on every
 * cluster its entries reference (synced), then, with fix_copied, the
 * entries' COPIED bits recomputed and the table written in place, then
 * addend on the table itself. *l1_entry gets its COPIED bit recomputed.
 */
static int walk_l2(qcow2_image *img, uint64_t *l1_entry, int64_t addend,
                   int fix_copied, uint8_t *table)
{
    uint64_t l2_offset = *l1_entry & L1E_OFFSET_MASK, refcount = 0;
    run_acc run = { 0, 0 };
    int changed = 0, rc;

    if (!is_aligned(l2_offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT, "L2 table offset 0x%llx "
                          "is not cluster aligned", ull(l2_offset));
    rc = qcow2_read_meta(img, l2_offset, table, img->cluster_size,
                         "L2 table");
    for (uint64_t i = 0; rc == 0 && addend && i < img->l2_entries; i++) {
        uint64_t entry = be64(table + i * img->l2_entry_bytes);
        uint64_t host = entry & L2E_OFFSET_MASK, offset, length;

        if (entry & QCOW_OFLAG_COMPRESSED) {
            /* Streams may share a host cluster: one update each. */
            rc = run_flush(img, &run, addend);
            compressed_range(img, entry, &offset, &length);
            if (rc == 0)
                rc = qcow2_refcount_update(img, offset, length, addend);
        } else if (host) {
            if (!is_aligned(host, img->cluster_size))
                return qcow2_fail(img, QCOW2_E_CORRUPT, "L2 entry 0x%llx "
                                  "is not cluster aligned", ull(entry));
            rc = run_add(img, &run, host, addend);
        }
    }
    if (rc == 0)
        rc = run_flush(img, &run, addend);
    if (rc == 0 && fix_copied) {
        /* The refcounts are on disk before the bits that mirror them. */
        rc = qcow2_barrier(img);
        for (uint64_t i = 0; rc == 0 && i < img->l2_entries; i++) {
            uint8_t *p = table + i * img->l2_entry_bytes;
            uint64_t entry = be64(p);
            rc = fix_entry_copied(img, &entry);
            if (rc == 0 && entry != be64(p)) {
                put_be64(p, entry);
                changed = 1;
            }
        }
        if (rc == 0 && changed) {
            rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2 |
                                     OVERLAP_INACTIVE_L2, "l2", l2_offset,
                                     table, img->cluster_size);
            qcow2_l2_cache_drop(img->l2_cache, l2_offset);
        }
    }
    if (rc == 0 && addend)
        rc = qcow2_refcount_update(img, l2_offset, img->cluster_size,
                                   addend);
    if (rc == 0)
        rc = qcow2_refcount_get(img, l2_offset >> img->cluster_bits,
                                &refcount);
    if (rc == 0) {
        *l1_entry &= ~QCOW_OFLAG_COPIED;
        if (refcount == 1)
            *l1_entry |= QCOW_OFLAG_COPIED;
    }
    return rc;
}

/* Every table of l1 (host order, updated in memory only), then a
 * barrier: the caller writes the L1 that depends on it. */
static int walk_l1(qcow2_image *img, uint64_t *l1, uint32_t l1_size,
                   int64_t addend, int fix_copied)
{
    uint8_t *table = malloc(img->cluster_size);
    int rc = table ? 0 : qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");

    for (uint32_t i = 0; rc == 0 && i < l1_size; i++) {
        if (l1[i] & L1E_RESERVED_MASK)
            rc = qcow2_fail(img, QCOW2_E_CORRUPT, "L1 entry %u has "
                            "reserved bits set: 0x%016llx", i, ull(l1[i]));
        else if (l1[i] & L1E_OFFSET_MASK)
            rc = walk_l2(img, &l1[i], addend, fix_copied, table);
    }
    free(table);
    if (rc == 0)
        rc = qcow2_barrier(img);
    return rc;
}

/* The active L1 (whole table, synced) from host-order entries. */
static int write_active_l1(qcow2_image *img, const uint64_t *l1)
{
    size_t bytes = (size_t)img->l1_size * 8;
    uint8_t *table = malloc(bytes ? bytes : 1);
    int rc;

    if (!table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint32_t i = 0; i < img->l1_size; i++)
        put_be64(table + 8ull * i, l1[i]);
    rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L1, "l1",
                             img->hdr.l1_table_offset, table, bytes);
    if (rc == 0)
        rc = qcow2_barrier(img);
    free(table);
    /* Half an L1 table on disk: nothing more may be trusted. */
    return rc < 0 ? qcow2_poison(img, rc) : 0;
}

/* COPIED recomputed on the active tables (QEMU: addend 0). */
static int recompute_active_copied(qcow2_image *img)
{
    size_t bytes = (size_t)img->l1_size * sizeof(uint64_t);
    uint64_t *l1 = malloc(bytes ? bytes : 1);
    int rc;

    if (!l1)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    memcpy(l1, img->l1, bytes);
    rc = walk_l1(img, l1, img->l1_size, 0, 1);
    if (rc == 0 && memcmp(l1, img->l1, bytes) != 0) {
        rc = write_active_l1(img, l1);
        if (rc == 0)
            memcpy(img->l1, l1, bytes);
    }
    free(l1);
    return rc;
}

/* ---- The snapshot table ------------------------------------------------- */

static uint32_t extra_bytes(const qcow2_snapshot *sn)
{
    return sn->extra_data_size > SNAPSHOT_EXTRA_BYTES ? sn->extra_data_size
                                                      : SNAPSHOT_EXTRA_BYTES;
}

static uint64_t entry_bytes(const qcow2_snapshot *sn)
{
    return SNAPSHOT_HEADER_BYTES + extra_bytes(sn) + strlen(sn->id) +
           strlen(sn->name);
}

/* Bytes of the table QEMU records (padding after the last entry not
 * counted); QCOW2_E_INVALID past QEMU's 64 MiB. */
static int table_size(qcow2_image *img, qcow2_snapshot *const *list,
                      uint32_t count, uint64_t *size)
{
    uint64_t offset = 0;

    for (uint32_t i = 0; i < count; i++) {
        offset = align_up(offset, 8) + entry_bytes(list[i]);
        if (offset > QCOW2_MAX_SNAPSHOT_TABLE)
            return qcow2_fail(img, QCOW2_E_INVALID, "snapshot table would "
                              "exceed %u bytes", QCOW2_MAX_SNAPSHOT_TABLE);
    }
    *size = offset;
    return 0;
}

/* One entry as QEMU's qcow2_write_snapshots writes it. */
static uint64_t put_entry(const qcow2_image *img, const qcow2_snapshot *sn,
                          uint8_t *p)
{
    uint32_t extra = extra_bytes(sn);
    size_t id_length = strlen(sn->id), name_length = strlen(sn->name);
    uint8_t *x = p + SNAPSHOT_HEADER_BYTES;

    put_be64(p, sn->l1_table_offset);
    put_be32(p + 8, sn->l1_size);
    put_be16(p + 12, (uint16_t)id_length);
    put_be16(p + 14, (uint16_t)name_length);
    put_be32(p + 16, sn->date_sec);
    put_be32(p + 20, sn->date_nsec);
    put_be64(p + 24, sn->vm_clock_nsec);
    /* Older readers then see a disk-only snapshot, not a truncated one. */
    put_be32(p + 32, sn->vm_state_size <= 0xffffffffu
                         ? (uint32_t)sn->vm_state_size : 0);
    put_be32(p + 36, extra);
    put_be64(x, sn->vm_state_size);
    put_be64(x + 8, sn->has_disk_size ? sn->disk_size : img->size);
    put_be64(x + 16, (uint64_t)sn->icount);
    /* Unknown extra data is kept verbatim. */
    if (sn->extra_data_size > SNAPSHOT_EXTRA_BYTES)
        memcpy(x + SNAPSHOT_EXTRA_BYTES,
               sn->extra_data + SNAPSHOT_EXTRA_BYTES,
               sn->extra_data_size - SNAPSHOT_EXTRA_BYTES);
    memcpy(x + extra, sn->id, id_length);
    memcpy(x + extra + id_length, sn->name, name_length);
    return SNAPSHOT_HEADER_BYTES + extra + id_length + name_length;
}

/* Table size of what is on disk now (0 when there is none). */
static uint64_t current_table_size(const qcow2_image *img)
{
    const qcow2_snapshot *last;

    if (img->nb_snapshots == 0)
        return 0;
    last = &img->snapshots[img->nb_snapshots - 1];
    return last->entry_offset + last->entry_length -
           img->hdr.snapshots_offset;
}

/*
 * QEMU's qcow2_write_snapshots: the whole table at fresh clusters,
 * synced, the header's (nb_snapshots, snapshots_offset) switched with one
 * synced write, the old table freed; then the parsed copy reloaded.
 */
static int write_table(qcow2_image *img, qcow2_snapshot *const *list,
                       uint32_t count)
{
    uint64_t size = 0, offset = 0, at = 0;
    uint64_t old_offset = img->hdr.snapshots_offset;
    uint64_t old_size = current_table_size(img);
    uint8_t *table = NULL;
    int rc = table_size(img, list, count, &size);

    if (rc < 0)
        return rc;
    if (count) {
        table = calloc(1, (size_t)size);
        if (!table)
            return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        for (uint32_t i = 0; i < count; i++) {
            at = align_up(at, 8);
            at += put_entry(img, list[i], table + at);
        }
        rc = qcow2_alloc_clusters(img, div_round_up(size, img->cluster_size),
                                  &offset);
        if (rc == 0)
            rc = qcow2_barrier(img);
        if (rc == 0) {
            rc = qcow2_write_checked(img, 0, "snapshot_table", offset, table,
                                     (size_t)size);
            if (rc == 0)
                rc = qcow2_barrier(img);
            if (rc < 0)
                (void)qcow2_free_clusters(img, offset, size);
        }
        free(table);
        if (rc < 0)
            return rc;
    }
    rc = qcow2_header_set_snapshots(img, offset, count);
    if (rc < 0) {
        /* The 12 bytes may or may not have landed. */
        return qcow2_poison(img, rc);
    }
    /* The parsed copy first: the overlap check reads it, and it must not
     * describe the old table at the new offset. */
    refresh_file_size(img);
    qcow2_snapshots_free(img);
    rc = qcow2_snapshots_load(img);
    if (rc < 0)
        return qcow2_poison(img, rc);
    if (old_size)
        (void)qcow2_free_clusters(img, old_offset, old_size);
    return 0;
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

/* Guest I/O at the VM-state area: the public calls' range limit is the
 * virtual size, here it is what the L1 table covers. */
static int vmstate_io(qcow2_image *img, uint64_t pos, void *buf,
                      size_t length, int writing)
{
    uint64_t start, end, saved = img->size;
    int rc;

    if (img->is_raw || img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "no VM state area in a "
                          "%s", img->is_raw ? "raw image" : "snapshot view");
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
static int copy_active_l1(qcow2_image *img, uint64_t *offset)
{
    size_t bytes = (size_t)img->l1_size * 8;
    uint8_t *table;
    int rc;

    *offset = 0;
    if (bytes == 0)
        return 0;
    table = malloc(bytes);
    if (!table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint32_t i = 0; i < img->l1_size; i++)
        put_be64(table + 8ull * i, img->l1[i]);
    rc = qcow2_alloc_clusters(img, div_round_up(bytes, img->cluster_size),
                              offset);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0) {
        rc = qcow2_write_checked(img, 0, "l1", *offset, table, bytes);
        if (rc == 0)
            rc = qcow2_barrier(img);
        if (rc < 0)
            (void)qcow2_free_clusters(img, *offset, bytes);
    }
    free(table);
    return rc;
}

static void now(uint32_t *sec, uint32_t *nsec)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    *sec = (uint32_t)ts.tv_sec;
    /* qemu-img takes g_get_real_time(): microseconds */
    *nsec = (uint32_t)(ts.tv_nsec / 1000 * 1000);
}

int qcow2_snapshot_create(qcow2_image *img, const char *name,
                          const qcow2_snapshot_create_opts *opts,
                          uint32_t *index)
{
    qcow2_snapshot_create_opts defaults;
    qcow2_snapshot sn, **list = NULL;
    char id[32];
    uint64_t *l1 = NULL;
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

    rc = copy_active_l1(img, &sn.l1_table_offset);
    if (rc < 0)
        return rc;
    /* From here on a failure leaks clusters and nothing else. */
    l1 = malloc(((size_t)img->l1_size + 1) * sizeof *l1);
    list = malloc(((size_t)img->nb_snapshots + 1) * sizeof *list);
    if (!l1 || !list) {
        rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        goto out;
    }
    memcpy(l1, img->l1, (size_t)img->l1_size * sizeof *l1);
    rc = walk_l1(img, l1, img->l1_size, 1, 1);
    if (rc == 0 && memcmp(l1, img->l1, (size_t)img->l1_size * 8) != 0) {
        rc = write_active_l1(img, l1);
        if (rc == 0)
            memcpy(img->l1, l1, (size_t)img->l1_size * sizeof *l1);
    }
    if (rc < 0)
        goto out;
    for (uint32_t i = 0; i < img->nb_snapshots; i++)
        list[i] = &img->snapshots[i];
    list[img->nb_snapshots] = &sn;
    rc = write_table(img, list, img->nb_snapshots + 1);
    if (rc < 0)
        goto out;
    if (opts->vm_state_size)
        discard_vmstate(img, opts->vm_state_size);
    if (index)
        *index = img->nb_snapshots - 1;
out:
    free(l1);
    free(list);
    return rc;
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

int qcow2_snapshot_apply(qcow2_image *img, uint32_t index)
{
    const qcow2_snapshot *sn;
    uint64_t *sn_l1 = NULL, *old_l1 = NULL, *new_l1 = NULL;
    uint64_t size, needed;
    uint32_t old_size;
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
    rc = load_snapshot_l1(img, sn, &sn_l1);
    if (rc < 0)
        return rc;
    /* QEMU: truncate to the snapshot's size, then grow to its L1 size. */
    rc = qcow2_l1_grow(img, max_u64(needed, sn->l1_size));
    if (rc < 0)
        goto out;
    new_l1 = calloc(img->l1_size ? img->l1_size : 1, sizeof *new_l1);
    if (!new_l1) {
        rc = qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
        goto out;
    }
    /* +1 first: the snapshot's tree is counted for the active L1 before
     * anything references it from there; its tables get COPIED right. */
    rc = walk_l1(img, sn_l1, sn->l1_size, 1, 1);
    if (rc < 0)
        goto out;
    memcpy(new_l1, sn_l1, (size_t)sn->l1_size * sizeof *new_l1);
    rc = write_active_l1(img, new_l1);
    if (rc < 0)
        goto out;
    old_l1 = img->l1;
    old_size = img->l1_size;
    img->l1 = new_l1;
    new_l1 = NULL;
    qcow2_l2_cache_drop_all(img->l2_cache);
    if (img->codec)
        qcow2_codec_forget(img->codec);
    if (size != img->size) {
        rc = qcow2_header_set_size(img, size);
        if (rc < 0) {
            rc = qcow2_poison(img, rc);
            goto out;
        }
        img->size = size;
    }
    /* The old tree is unreferenced now: dropping it can only leak. */
    rc = walk_l1(img, old_l1, old_size, -1, 0);
    if (rc == 0)
        rc = recompute_active_copied(img);
out:
    free(sn_l1);
    free(old_l1);
    free(new_l1);
    return rc;
}

/* ---- Delete ------------------------------------------------------------- */

int qcow2_snapshot_delete(qcow2_image *img, uint32_t index)
{
    qcow2_snapshot **list;
    uint64_t *sn_l1 = NULL, l1_offset;
    uint32_t l1_size, count = 0;
    int rc = common_checks(img, "delete a snapshot");

    if (rc < 0)
        return rc;
    if (index >= img->nb_snapshots)
        return qcow2_fail(img, QCOW2_E_NOTFOUND, "snapshot index %u out of "
                          "range (%u snapshots)", index, img->nb_snapshots);
    rc = load_snapshot_l1(img, &img->snapshots[index], &sn_l1);
    if (rc < 0)
        return rc;
    l1_offset = img->snapshots[index].l1_table_offset;
    l1_size = img->snapshots[index].l1_size;
    list = malloc(((size_t)img->nb_snapshots + 1) * sizeof *list);
    if (!list) {
        free(sn_l1);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    for (uint32_t i = 0; i < img->nb_snapshots; i++)
        if (i != index)
            list[count++] = &img->snapshots[i];
    rc = write_table(img, list, count);
    free(list);
    /* The snapshot is gone from the table: from here on, only leaks. */
    if (rc == 0)
        rc = walk_l1(img, sn_l1, l1_size, -1, 0);
    if (rc == 0 && l1_size)
        rc = qcow2_free_clusters(img, l1_offset, (uint64_t)l1_size * 8);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0)
        rc = recompute_active_copied(img);
    free(sn_l1);
    return rc;
}
