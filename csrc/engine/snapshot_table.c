/*
 * The snapshot table, the format codec (layer 3): parsed whole at open
 * with QEMU's limits applied, and encoded again as QEMU's
 * qcow2_write_snapshots lays it out. Views of a snapshot are
 * snapshot_view.c's; writing the table in place is snapshot_write.c's and
 * repair.c's.
 */
#include <stdlib.h>
#include <string.h>

#include "format.h"

#define SNAPSHOT_HEADER_BYTES   40
/* Known extra data: vm_state_size (64-bit), disk size, icount. */
#define EXTRA_VM_STATE_END      8
#define EXTRA_DISK_SIZE_END     16
#define EXTRA_ICOUNT_END        24
/* What every entry written gets: vm_state_size, disk_size, icount. */
#define SNAPSHOT_EXTRA_BYTES    EXTRA_ICOUNT_END

/* ---- Parsing ---------------------------------------------------------------- */

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
    size_t done;
    int rc = qcow2_pread_zero_fill(img->io, offset, buf, length, &done);

    return rc < 0 ? qcow2_fail(img, rc, "cannot read the snapshot table") : 0;
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

    /* a read-only open takes a table past the end of the file */
    ret = qcow2_read_meta_lenient(img, offset, fixed, sizeof fixed,
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
        ret = qcow2_read_meta_lenient(img, offset + SNAPSHOT_HEADER_BYTES,
                                      variable, (size_t)variable_length,
                                      "snapshot table");
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
static int check_snapshot_table_strict(qcow2_image *img, uint64_t length)
{
    const qcow2_header *h = &img->hdr;
    int ret;

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

/* The strict checks, or for a lenient open only QEMU's (header.c). */
static int check_snapshot_table_place(qcow2_image *img, uint64_t length)
{
    int ret;

    /* an open for repair takes the table wherever it lies, as QEMU does
     * (header.c checked its alignment); the check reports the rest */
    if (img->open_for_repair)
        return 0;
    /* a read-only open keeps what the checks below refuse as damage */
    ret = check_snapshot_table_strict(img, length);
    if (ret < 0 && img->read_only) {
        qcow2_note_damage(img);
        return 0;
    }
    return ret;
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

/* ---- The parsed table --------------------------------------------------------- */

uint64_t qcow2_snapshot_table_size(const qcow2_image *img)
{
    const qcow2_snapshot *last;

    if (img->nb_snapshots == 0)
        return 0;
    last = &img->snapshots[img->nb_snapshots - 1];
    return last->entry_offset + last->entry_length -
           img->hdr.snapshots_offset;
}

uint32_t qcow2_snapshot_count(const qcow2_image *img)
{
    return img->nb_snapshots;
}

uint64_t qcow2_snapshot_disk_size(const qcow2_image *img,
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
    out->disk_size = qcow2_snapshot_disk_size(img, sn);
    out->has_icount = sn->has_icount;
    out->icount = sn->has_icount ? sn->icount : -1;
    out->l1_table_offset = sn->l1_table_offset;
    out->l1_size = sn->l1_size;
    out->extra_data_size = sn->extra_data_size;
    out->extra_data = sn->extra_data_size ? sn->extra_data : NULL;
    out->entry_offset = sn->entry_offset;
    out->entry_length = sn->entry_length;
    return 0;
}

/* ---- Encoding ---------------------------------------------------------------- */

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
static int encoded_size(qcow2_image *img, qcow2_snapshot *const *list,
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

/* The bytes of the table holding `list` (snapshot_table.h). */
int qcow2_snapshot_table_build(qcow2_image *img, qcow2_snapshot *const *list,
                               uint32_t count, uint8_t **table,
                               uint64_t *size)
{
    uint64_t at = 0;
    int rc = encoded_size(img, list, count, size);

    *table = NULL;
    if (rc < 0 || count == 0)
        return rc;
    *table = calloc(1, (size_t)*size);
    if (!*table)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    for (uint32_t i = 0; i < count; i++) {
        at = align_up(at, 8);
        at += put_entry(img, list[i], *table + at);
    }
    return 0;
}

