/*
 * Internal snapshots: the snapshot table (parsed whole at open, QEMU's
 * limits applied) and read-only views of the disk at a snapshot.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define SNAPSHOT_HEADER_BYTES   40
/* Known extra data: vm_state_size (64-bit), disk size, icount. */
#define EXTRA_VM_STATE_END      8
#define EXTRA_DISK_SIZE_END     16
#define EXTRA_ICOUNT_END        24

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

static char *copy_string(const uint8_t *bytes, size_t length)
{
    char *text = malloc(length + 1);

    if (text) {
        memcpy(text, bytes, length);
        text[length] = '\0';
    }
    return text;
}

/* The extra data QEMU knows; the rest is kept verbatim in extra_data. A v3
 * entry with less than 16 bytes is "incomplete" for qemu-img check but
 * still opens: the disk size then defaults to the image's. */
static void parse_extra_data(qcow2_snapshot *sn)
{
    const uint8_t *extra = sn->extra_data;

    sn->vm_state_size = sn->vm_state_size32;
    if (sn->extra_data_size >= EXTRA_VM_STATE_END)
        sn->vm_state_size = be64(extra);
    if (sn->extra_data_size >= EXTRA_DISK_SIZE_END) {
        sn->has_disk_size = 1;
        sn->disk_size = be64(extra + 8);
    }
    if (sn->extra_data_size >= EXTRA_ICOUNT_END) {
        sn->icount = (int64_t)be64(extra + 16);
        sn->has_icount = sn->icount != -1;   /* -1: not recorded */
    } else {
        sn->icount = -1;
    }
}

static void parse_fixed_part(qcow2_snapshot *sn, const uint8_t *fixed,
                             uint32_t *id_length, uint32_t *name_length)
{
    sn->l1_table_offset = be64(fixed);
    sn->l1_size = be32(fixed + 8);
    *id_length = be16(fixed + 12);
    *name_length = be16(fixed + 14);
    sn->date_sec = be32(fixed + 16);
    sn->date_nsec = be32(fixed + 20);
    sn->vm_clock_nsec = be64(fixed + 24);
    sn->vm_state_size32 = be32(fixed + 32);
    sn->extra_data_size = be32(fixed + 36);
}

/* An oversized entry met by a repair-mode open reads as QEMU's block layer
 * reads it: the part past the end of the file is zeroes (the length is
 * already bounded by the 64 MiB table limit). */
static int read_zero_filled(qcow2_image *img, uint64_t offset, uint8_t *buf,
                            size_t length)
{
    size_t done = 0;

    while (done < length) {
        int64_t n = img->io->ops->pread(img->io, buf + done, length - done,
                                        offset + done);
        if (n < 0)
            return qcow2_fail(img, (int)n, "cannot read the snapshot table");
        if (n == 0)
            break;
        done += (size_t)n;
    }
    memset(buf + done, 0, length - done);
    return 0;
}

/*
 * One entry at `offset` (8-byte aligned). Every read is bounded by the
 * file (qcow2_read_meta) and the table by QEMU's 64 MiB; *entry_end gets
 * the first byte after the entry, padding excluded.
 */
static int read_snapshot_entry(qcow2_image *img, uint32_t index,
                               uint64_t offset, qcow2_snapshot *sn,
                               uint64_t *entry_end)
{
    uint8_t fixed[SNAPSHOT_HEADER_BYTES];
    uint32_t id_length, name_length;
    uint64_t variable_length, table_end;
    uint8_t *variable;
    int ret;

    ret = qcow2_read_meta(img, offset, fixed, sizeof fixed,
                          "snapshot table");
    if (ret < 0)
        return ret;
    parse_fixed_part(sn, fixed, &id_length, &name_length);
    sn->entry_offset = offset;
    /* QEMU refuses the image, except when opened for check -r all, which
     * keeps the first 1024 bytes and rewrites the table (check.c). */
    if (sn->extra_data_size > QCOW2_MAX_SNAPSHOT_EXTRA && !img->open_for_repair)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "snapshot %u: extra_data_size %u too large "
                          "(max %u)", index, sn->extra_data_size,
                          QCOW2_MAX_SNAPSHOT_EXTRA);
    variable_length = (uint64_t)sn->extra_data_size + id_length + name_length;
    /* bounded before the 32-bit entry_length and the allocation below */
    if (variable_length > QCOW2_MAX_SNAPSHOT_TABLE)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "snapshot table larger than %u bytes at "
                          "snapshot %u", QCOW2_MAX_SNAPSHOT_TABLE, index);
    sn->entry_length = (uint32_t)(SNAPSHOT_HEADER_BYTES + variable_length);
    table_end = offset + sn->entry_length;
    if (table_end - img->hdr.snapshots_offset > QCOW2_MAX_SNAPSHOT_TABLE)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "snapshot table larger than %u bytes at "
                          "snapshot %u", QCOW2_MAX_SNAPSHOT_TABLE, index);

    variable = malloc((size_t)variable_length + 1);
    if (!variable)
        return qcow2_fail(img, QCOW2_E_NOMEM,
                          "out of memory for the snapshot table");
    if (sn->extra_data_size > QCOW2_MAX_SNAPSHOT_EXTRA)
        ret = read_zero_filled(img, offset + SNAPSHOT_HEADER_BYTES, variable,
                               (size_t)variable_length);
    else
        ret = qcow2_read_meta(img, offset + SNAPSHOT_HEADER_BYTES, variable,
                              (size_t)variable_length, "snapshot table");
    if (ret == 0) {
        sn->extra_data = malloc(sn->extra_data_size + 1);
        sn->id = copy_string(variable + sn->extra_data_size, id_length);
        sn->name = copy_string(variable + sn->extra_data_size + id_length,
                               name_length);
        if (!sn->extra_data || !sn->id || !sn->name)
            ret = qcow2_fail(img, QCOW2_E_NOMEM,
                             "out of memory for the snapshot table");
        else
            memcpy(sn->extra_data, variable, sn->extra_data_size);
    }
    free(variable);
    if (ret < 0)
        return ret;
    if (sn->extra_data_size > QCOW2_MAX_SNAPSHOT_EXTRA) {
        sn->extra_data_size = QCOW2_MAX_SNAPSHOT_EXTRA;  /* entry_length
                                   keeps the on-disk size */
        img->snapshot_extra_dropped++;
    }
    parse_extra_data(sn);
    *entry_end = table_end;
    /* A snapshot's L1 is not checked here: QEMU opens (and checks, and
     * repairs) an image whose snapshot entry points at a bad L1, and only
     * using that snapshot fails; load_view_l1 validates it on use. */
    (void)index;
    return 0;
}

/* The whole table, now that its length is known, against the others. */
static int check_snapshot_table_place(qcow2_image *img, uint64_t length)
{
    const qcow2_header *h = &img->hdr;
    int ret;

    /* an open for repair takes the table wherever it lies, as QEMU does
     * (header.c checked its alignment); the check reports the rest */
    if (img->open_for_repair)
        return 0;
    /* extra data cut at a repair-mode open may have reached past the end
     * of the file (QEMU reads it as zeroes): the table stays in cluster
     * terms, only its tail beyond the file is forgiven */
    if (img->snapshot_extra_dropped &&
        !range_inside(h->snapshots_offset, length, img->file_size))
        length = img->file_size > h->snapshots_offset
                     ? img->file_size - h->snapshots_offset : length;
    ret = qcow2_check_table(img, "snapshot table", h->snapshots_offset,
                            length);
    if (ret < 0)
        return ret;
    ret = qcow2_check_tables_apart(img, "snapshot table", h->snapshots_offset,
                                   length, "L1 table", h->l1_table_offset,
                                   (uint64_t)h->l1_size * 8);
    if (ret < 0)
        return ret;
    return qcow2_check_tables_apart(img, "snapshot table",
                                    h->snapshots_offset, length,
                                    "refcount table",
                                    h->refcount_table_offset,
                                    (uint64_t)h->refcount_table_clusters <<
                                        img->cluster_bits);
}

int qcow2_snapshots_load(qcow2_image *img)
{
    uint32_t count = img->hdr.nb_snapshots;
    uint64_t offset = img->hdr.snapshots_offset, entry_end = offset;
    int ret;

    if (count == 0)
        return 0;
    /* header.c bounded count by 65536 and 40 bytes a snapshot by the file */
    img->snapshots = calloc(count, sizeof *img->snapshots);
    if (!img->snapshots)
        return qcow2_fail(img, QCOW2_E_NOMEM,
                          "out of memory for %u snapshots", count);
    for (uint32_t i = 0; i < count; i++) {
        /* counted now so that a failure frees what this entry got */
        img->nb_snapshots = i + 1;
        ret = read_snapshot_entry(img, i, offset, &img->snapshots[i],
                                  &entry_end);
        if (ret < 0)
            return ret;
        offset = align_up(entry_end, 8);
    }
    return check_snapshot_table_place(img, entry_end -
                                           img->hdr.snapshots_offset);
}

void qcow2_snapshots_free(qcow2_image *img)
{
    for (uint32_t i = 0; img->snapshots && i < img->nb_snapshots; i++) {
        free(img->snapshots[i].id);
        free(img->snapshots[i].name);
        free(img->snapshots[i].extra_data);
    }
    free(img->snapshots);
    img->snapshots = NULL;
    img->nb_snapshots = 0;
}

/* ---- Public ---------------------------------------------------------------- */

uint32_t qcow2_snapshot_count(const qcow2_image *img)
{
    return img->nb_snapshots;
}

static uint64_t snapshot_disk_size(const qcow2_image *img,
                                   const qcow2_snapshot *sn)
{
    return sn->has_disk_size ? sn->disk_size : img->size;
}

int qcow2_snapshot_get(const qcow2_image *img, uint32_t index,
                       qcow2_snapshot_info *out)
{
    const qcow2_snapshot *sn;

    if (index >= img->nb_snapshots)
        return QCOW2_E_INVALID;
    sn = &img->snapshots[index];
    memset(out, 0, sizeof *out);
    out->id = sn->id;
    out->name = sn->name;
    out->date_sec = sn->date_sec;
    out->date_nsec = sn->date_nsec;
    out->vm_clock_nsec = sn->vm_clock_nsec;
    out->vm_state_size = sn->vm_state_size;
    out->disk_size = snapshot_disk_size(img, sn);
    out->has_icount = sn->has_icount;
    out->icount = sn->has_icount ? sn->icount : -1;
    out->l1_table_offset = sn->l1_table_offset;
    out->l1_size = sn->l1_size;
    out->extra_data_size = sn->extra_data_size;
    return 0;
}

static int copy_optional(const char *text, char **out)
{
    *out = NULL;
    if (!text)
        return 0;
    *out = strdup(text);
    return *out ? 0 : QCOW2_E_NOMEM;
}

/* Names and the refcount table: owned copies, so that closing a view frees
 * exactly what it holds. */
static int copy_view_state(qcow2_image *view, const qcow2_image *parent)
{
    if (copy_optional(parent->dir, &view->dir) < 0 ||
        copy_optional(parent->backing_name, &view->backing_name) < 0 ||
        copy_optional(parent->backing_format_ext,
                      &view->backing_format_ext) < 0 ||
        copy_optional(parent->data_file_ext, &view->data_file_ext) < 0)
        return QCOW2_E_NOMEM;
    view->ext = parent->ext;
    view->ext.backing_format = view->backing_format_ext;
    view->ext.data_file = view->data_file_ext;
    if (parent->reftable_entries) {
        size_t bytes = (size_t)parent->reftable_entries * 8;
        view->reftable = malloc(bytes);
        if (!view->reftable)
            return QCOW2_E_NOMEM;
        memcpy(view->reftable, parent->reftable, bytes);
        view->reftable_entries = parent->reftable_entries;
    }
    return 0;
}

static char *view_path(const qcow2_image *parent, const qcow2_snapshot *sn)
{
    const char *path = parent->path ? parent->path : "qcow2";
    size_t length = strlen(path) + 1 + strlen(sn->name) + 1;
    char *joined = malloc(length);

    if (joined) {
        memcpy(joined, path, strlen(path));
        joined[strlen(path)] = '@';
        memcpy(joined + strlen(path) + 1, sn->name, strlen(sn->name) + 1);
    }
    return joined;
}

/* The view as the parent was at the snapshot: geometry and file borrowed,
 * size, L1 and header fields the snapshot's. */
static qcow2_image *new_view(qcow2_image *parent, const qcow2_snapshot *sn)
{
    qcow2_image *view = calloc(1, sizeof *view);

    if (!view)
        return NULL;
    view->path = view_path(parent, sn);
    if (!view->path || copy_view_state(view, parent) < 0) {
        qcow2_close(view);
        return NULL;
    }
    view->io = parent->io;
    view->data_io = parent->data_io;
    view->read_only = 1;
    view->is_snapshot_view = 1;
    view->depth = parent->depth;
    view->hdr = parent->hdr;
    view->hdr.size = snapshot_disk_size(parent, sn);
    view->hdr.l1_size = sn->l1_size;
    view->hdr.l1_table_offset = sn->l1_table_offset;
    view->hdr.nb_snapshots = 0;
    view->hdr.snapshots_offset = 0;
    view->file_size = parent->file_size;
    view->cluster_bits = parent->cluster_bits;
    view->cluster_size = parent->cluster_size;
    view->extended_l2 = parent->extended_l2;
    view->l2_entry_bytes = parent->l2_entry_bytes;
    view->l2_bits = parent->l2_bits;
    view->l2_entries = parent->l2_entries;
    view->subcluster_bits = parent->subcluster_bits;
    view->subcluster_size = parent->subcluster_size;
    view->refcount_bits = parent->refcount_bits;
    view->refcount_codec = parent->refcount_codec;
    view->refblock_entries = parent->refblock_entries;
    view->size = snapshot_disk_size(parent, sn);
    view->compression_type = parent->compression_type;
    view->backing = parent->backing;
    return view;
}

/* The snapshot's L1 must be a real table able to map its disk size. */
static int load_view_l1(qcow2_image *view, const qcow2_snapshot *sn)
{
    uint64_t needed;
    int ret;

    if (qcow2_l1_entries_needed(view, view->size, &needed) < 0 ||
        sn->l1_size < needed)
        return qcow2_fail(view, QCOW2_E_CORRUPT,
                          "snapshot L1 table of %u entries too small for "
                          "disk size %llu", sn->l1_size, ull(view->size));
    ret = qcow2_check_table(view, "snapshot L1 table", sn->l1_table_offset,
                            (uint64_t)sn->l1_size * 8);
    if (ret < 0)
        return ret;
    ret = qcow2_l1_load(view, sn->l1_table_offset, sn->l1_size,
                        "snapshot L1 table", &view->l1);
    if (ret < 0)
        return ret;
    view->l1_size = sn->l1_size;
    return 0;
}

int qcow2_snapshot_open(qcow2_image *parent, uint32_t index,
                        qcow2_image **out)
{
    qcow2_image *view;
    int ret;

    *out = NULL;
    if (parent->is_raw || parent->is_snapshot_view)
        return qcow2_fail(parent, QCOW2_E_INVALID,
                          "no snapshots in a %s", parent->is_raw
                              ? "raw image" : "snapshot view");
    if (index >= parent->nb_snapshots)
        return qcow2_fail(parent, QCOW2_E_INVALID,
                          "snapshot index %u out of range (%u snapshots)",
                          index, parent->nb_snapshots);
    view = new_view(parent, &parent->snapshots[index]);
    if (!view)
        return qcow2_fail(parent, QCOW2_E_NOMEM,
                          "out of memory for a snapshot view");
    ret = load_view_l1(view, &parent->snapshots[index]);
    if (ret == 0)
        ret = qcow2_l2_cache_new(view, qcow2_default_l2_cache_bytes(view),
                                 &view->l2_cache);
    if (ret < 0) {
        /* the view's message names the snapshot; hand it to the caller */
        if (view->err.code == 0)
            qcow2_fail(view, ret, "cannot create the L2 cache");
        parent->err = view->err;
        qcow2_close(view);
        return ret;
    }
    view->l2_cache_bytes = qcow2_default_l2_cache_bytes(view);
    *out = view;
    return 0;
}
