/*
 * L1/L2 lookup: from a guest offset to the state of its (sub)cluster and
 * the run of guest bytes that share it.
 *
 * Every entry is validated before anything is done with it; an entry the
 * format forbids fails the lookup with QCOW2_E_CORRUPT naming the guest
 * offset, the entry and the reason, rather than reading as zeroes.
 */
#include <inttypes.h>
#include <string.h>

#include "read_path.h"

/* Where one guest offset lives in the tables. */
typedef struct l2_position {
    uint64_t guest_offset;
    uint64_t l1_index;
    uint64_t l2_index;
    uint64_t l2_offset;         /* host offset of the L2 table, 0 = none */
} l2_position;

/* One L2 entry, decoded. Without extended L2 the cluster is a single
 * subcluster (bit 0 of the masks). */
typedef struct cluster_desc {
    uint64_t entry;             /* word 0 */
    uint64_t bitmap;            /* word 1 (extended L2), else 0 */
    int compressed;
    int has_host;               /* a host cluster is allocated */
    uint64_t host_cluster;
    uint32_t normal_mask;       /* subclusters holding data */
    uint32_t zero_mask;         /* subclusters reading as zeroes */
    uint64_t coffset, csize;    /* compressed stream */
} cluster_desc;

/* File ends, fetched once per lookup. */
typedef struct file_ends {
    uint64_t image;             /* img->io */
    uint64_t data;              /* img->data_io */
} file_ends;

static int io_end(qcow2_image *img, qcow2_io *io, uint64_t *end)
{
    int rc = io->ops->size(io, end);
    if (rc < 0)
        return qcow2_fail(img, rc, "cannot get the size of the %s",
                          io == img->io ? "image file" : "data file");
    return 0;
}

int qcow2_data_file_end(qcow2_image *img, uint64_t *end)
{
    return io_end(img, img->data_io ? img->data_io : img->io, end);
}

static int get_file_ends(qcow2_image *img, file_ends *ends)
{
    int rc = 0;

    /* A read-only image file cannot grow under us: skip the fstat. */
    if (img->read_only && img->file_size != 0)
        ends->image = img->file_size;
    else
        rc = io_end(img, img->io, &ends->image);
    if (rc < 0)
        return rc;
    if (!img->data_io || img->data_io == img->io) {
        ends->data = ends->image;
        return 0;
    }
    return io_end(img, img->data_io, &ends->data);
}

static int has_data_file(const qcow2_image *img)
{
    return img->data_io && img->data_io != img->io;
}

static uint32_t subclusters_per_cluster(const qcow2_image *img)
{
    return img->extended_l2 ? 32u : 1u;
}

/* ---- L1 ------------------------------------------------------------------ */

static void locate(const qcow2_image *img, uint64_t guest_offset,
                   l2_position *pos)
{
    uint64_t cluster_index = guest_offset >> img->cluster_bits;

    pos->guest_offset = guest_offset;
    pos->l1_index = cluster_index >> img->l2_bits;
    pos->l2_index = cluster_index & (img->l2_entries - 1);
    pos->l2_offset = 0;
}

/* 1 when the L1 entry maps nothing and is valid that way. */
static int l1_entry_empty(const qcow2_image *img, uint64_t l1_index)
{
    return l1_index >= img->l1_size || !img->l1 ||
           (img->l1[l1_index] & (L1E_RESERVED_MASK | L1E_OFFSET_MASK)) == 0;
}

/* The L2 table offset of an L1 entry, validated; 0 when there is none. */
static int l1_entry_table(qcow2_image *img, uint64_t l1_index,
                          uint64_t guest_offset, uint64_t *l2_offset,
                          file_ends *ends)
{
    uint64_t entry, offset;
    int rc;

    *l2_offset = 0;
    if (l1_entry_empty(img, l1_index))
        return 0;
    entry = img->l1[l1_index];
    if (entry & L1E_RESERVED_MASK)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "guest offset 0x%" PRIx64 ": L1 entry %" PRIu64
                          " has reserved bits set: 0x%016" PRIx64,
                          guest_offset, l1_index, entry);
    offset = entry & L1E_OFFSET_MASK;
    if (!is_aligned(offset, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "guest offset 0x%" PRIx64 ": L1 entry %" PRIu64
                          " (0x%016" PRIx64 "): L2 table offset 0x%" PRIx64
                          " is not cluster aligned",
                          guest_offset, l1_index, entry, offset);
    rc = get_file_ends(img, ends);
    if (rc < 0)
        return rc;
    /* Aligned and non-zero, so never cluster 0 (the header). */
    if (!range_inside(offset, img->cluster_size, ends->image))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "guest offset 0x%" PRIx64 ": L1 entry %" PRIu64
                          " (0x%016" PRIx64 "): L2 table at 0x%" PRIx64
                          " is not inside the file (size 0x%" PRIx64 ")",
                          guest_offset, l1_index, entry, offset,
                          ends->image);
    *l2_offset = offset;
    return 0;
}

/* ---- L2 entries ------------------------------------------------------------ */

static void read_entry(const qcow2_image *img, const uint8_t *table,
                       uint64_t l2_index, cluster_desc *desc)
{
    const uint8_t *p = table + l2_index * img->l2_entry_bytes;

    memset(desc, 0, sizeof *desc);
    desc->entry = be64(p);
    desc->bitmap = img->extended_l2 ? be64(p + 8) : 0;
}

/* Format doc 3.4: x = 70 - cluster_bits bits of byte offset, then the
 * count of additional 512-byte sectors. */
static const char *decode_compressed(const qcow2_image *img,
                                     const file_ends *ends,
                                     cluster_desc *desc)
{
    uint32_t x = 70 - img->cluster_bits;
    uint64_t sector_field = (1ull << (img->cluster_bits - 8)) - 1;
    uint64_t nsectors;

    if (has_data_file(img))
        return "compressed cluster in an image with an external data file";
    if (desc->bitmap)
        return "compressed cluster with a non-zero subcluster bitmap";
    desc->compressed = 1;
    desc->coffset = desc->entry & ((1ull << x) - 1);
    nsectors = ((desc->entry >> x) & sector_field) + 1;
    desc->csize = nsectors * 512 - (desc->coffset & 511);
    if (desc->coffset > QCOW2_MAX_HOST_OFFSET)
        return "compressed data offset has bits above 55 set";
    if (desc->coffset < img->cluster_size)
        return "compressed data points into the header cluster";
    if (desc->coffset >= ends->image)
        return "compressed data starts past the end of the file";
    return NULL;
}

/* Standard entry (3.3), or word 0 and bitmap of an extended one (3.5). */
static const char *decode_standard(const qcow2_image *img,
                                   cluster_desc *desc)
{
    uint64_t entry = desc->entry;
    uint64_t host = entry & L2E_OFFSET_MASK;
    /* With a data file, offset 0 is a real cluster when COPIED says so. */
    int allocated = host != 0 ||
                    (has_data_file(img) && (entry & QCOW_OFLAG_COPIED));

    if (entry & L2E_RESERVED_MASK)
        return "reserved bits set";
    if (!img->extended_l2) {
        if (entry & QCOW_OFLAG_ZERO) {
            if (img->hdr.version < 3)
                return "zero flag set in a version 2 image";
            desc->zero_mask = 1;
            /* QEMU: a zero cluster with offset 0 is ZERO_PLAIN even with
             * a data file. */
            allocated = host != 0;
        } else if (allocated) {
            desc->normal_mask = 1;
        }
    } else {
        /* Bit 0 of word 0 is unused with extended L2; QEMU ignores it. */
        uint32_t alloc_bits = (uint32_t)desc->bitmap;
        uint32_t zero_bits = (uint32_t)(desc->bitmap >> 32);

        if (allocated && (alloc_bits & zero_bits))
            return "subcluster bitmap marks subclusters both allocated "
                   "and zero";
        if (!allocated && alloc_bits)
            return "subcluster bitmap marks subclusters allocated in a "
                   "cluster without a host offset";
        desc->normal_mask = alloc_bits;
        desc->zero_mask = zero_bits;
    }
    desc->has_host = allocated;
    desc->host_cluster = host;
    return NULL;
}

/* Checks on the host cluster of an allocated entry. */
static const char *check_host(const qcow2_image *img, const file_ends *ends,
                              uint64_t guest_cluster,
                              const cluster_desc *desc)
{
    if (!desc->has_host)
        return NULL;
    if (!is_aligned(desc->host_cluster, img->cluster_size))
        return "host offset is not cluster aligned";
    /* Format doc 9: external data files map guest offsets 1:1. */
    if (has_data_file(img) && desc->host_cluster != guest_cluster)
        return "host offset differs from the guest offset in an external "
               "data file";
    /* A cluster whose tail is past EOF reads zeroes there (QEMU does not
     * pad the last cluster); one that starts past EOF is a lie. */
    if (desc->normal_mask && desc->host_cluster >= ends->data)
        return "data cluster starts past the end of the file";
    return NULL;
}

static const char *decode_entry(const qcow2_image *img,
                                const file_ends *ends, const uint8_t *table,
                                uint64_t l2_index, uint64_t guest_cluster,
                                cluster_desc *desc)
{
    const char *why;

    read_entry(img, table, l2_index, desc);
    if (desc->entry & QCOW_OFLAG_COMPRESSED)
        return decode_compressed(img, ends, desc);
    why = decode_standard(img, desc);
    return why ? why : check_host(img, ends, guest_cluster, desc);
}

static int fail_entry(qcow2_image *img, const l2_position *pos,
                      const cluster_desc *desc, const char *why)
{
    if (img->extended_l2)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "guest offset 0x%" PRIx64 ": L2 entry %" PRIu64
                          " of the table at 0x%" PRIx64 " (L1 entry %" PRIu64
                          ") is 0x%016" PRIx64 " bitmap 0x%016" PRIx64
                          ": %s", pos->guest_offset, pos->l2_index,
                          pos->l2_offset, pos->l1_index, desc->entry,
                          desc->bitmap, why);
    return qcow2_fail(img, QCOW2_E_CORRUPT,
                      "guest offset 0x%" PRIx64 ": L2 entry %" PRIu64
                      " of the table at 0x%" PRIx64 " (L1 entry %" PRIu64
                      ") is 0x%016" PRIx64 ": %s", pos->guest_offset,
                      pos->l2_index, pos->l2_offset, pos->l1_index,
                      desc->entry, why);
}

/* ---- Subcluster states ------------------------------------------------------- */

static int sc_type_at(const cluster_desc *desc, uint32_t sc_index)
{
    uint32_t bit = 1u << sc_index;

    if (desc->compressed)
        return SC_COMPRESSED;
    if (desc->normal_mask & bit)
        return SC_NORMAL;
    if (desc->zero_mask & bit)
        return desc->has_host ? SC_ZERO_ALLOC : SC_ZERO_PLAIN;
    return desc->has_host ? SC_UNALLOCATED_ALLOC : SC_UNALLOCATED_PLAIN;
}

/* How many subclusters from sc_index on share sc_index's state. */
static uint32_t sc_same_count(const cluster_desc *desc, uint32_t sc_index,
                              uint32_t sc_count)
{
    uint32_t mask;
    uint64_t wide;

    switch (sc_type_at(desc, sc_index)) {
    case SC_NORMAL:
        mask = desc->normal_mask;
        break;
    case SC_ZERO_PLAIN:
    case SC_ZERO_ALLOC:
        mask = desc->zero_mask;
        break;
    case SC_COMPRESSED:
        mask = UINT32_MAX;
        break;
    default:
        mask = ~(desc->normal_mask | desc->zero_mask);
        break;
    }
    /* Count the ones from sc_index up; a 64-bit copy keeps a zero above
     * bit 31 so the count always ends. */
    wide = ((uint64_t)mask >> sc_index);
    return (uint32_t)min_u64((uint64_t)__builtin_ctzll(~wide),
                             sc_count - sc_index);
}

/* ---- Runs ------------------------------------------------------------------ */

/* No L2 table: unallocated up to the next L1 entry that maps something
 * (crossing empty entries keeps a sparse disk's walk short). */
static void unallocated_run(const qcow2_image *img, const l2_position *pos,
                            uint64_t first_len, uint64_t max_len,
                            qcow2_run *run)
{
    uint64_t table_span = img->l2_entries << img->cluster_bits;
    uint64_t length = first_len;
    uint64_t l1_index = pos->l1_index + 1;

    while (length < max_len && l1_index < img->l1_size &&
           l1_entry_empty(img, l1_index)) {
        length += table_span;
        l1_index++;
    }
    /* Past the L1 table nothing is mapped at all. */
    if (l1_index >= img->l1_size)
        length = max_len;
    run->type = SC_UNALLOCATED_PLAIN;
    run->length = min_u64(length, max_len);
}

/* Grow a run that reached the end of its cluster over the following
 * clusters of the same table while state and host offsets continue. */
static uint64_t extend_run(const qcow2_image *img, const file_ends *ends,
                          const uint8_t *table, const l2_position *pos,
                          const qcow2_run *run, uint64_t length,
                          uint64_t limit)
{
    uint32_t sc_count = subclusters_per_cluster(img);
    uint64_t l2_index = pos->l2_index;
    uint64_t guest_cluster = pos->guest_offset & ~(img->cluster_size - 1);

    while (length < limit) {
        cluster_desc desc;
        uint32_t same;

        l2_index++;
        guest_cluster += img->cluster_size;
        if (l2_index >= img->l2_entries ||
            decode_entry(img, ends, table, l2_index, guest_cluster, &desc))
            break;  /* a bad entry is reported when a lookup starts on it */
        if (sc_type_at(&desc, 0) != run->type)
            break;
        if (sc_type_has_host(run->type) &&
            desc.host_cluster != run->host_offset + length)
            break;
        same = sc_same_count(&desc, 0, sc_count);
        length += (uint64_t)same << img->subcluster_bits;
        if (same < sc_count)
            break;
    }
    return min_u64(length, limit);
}

/* A damaged unit [unit_start, unit_start + unit_length) met at the run's
 * start: the run covers the rest of it (at most max_len). The reason is
 * the message the failed check left. */
static int corrupt_run(int rc, uint64_t unit_start,
                       uint64_t unit_length, uint64_t max_len,
                       qcow2_run *run)
{
    if (rc != QCOW2_E_CORRUPT)
        return rc;
    run->type = SC_CORRUPT;
    run->damage_start = unit_start;
    run->damage_length = unit_length;
    run->length = min_u64(unit_length - (run->guest_offset - unit_start),
                          max_len);
    return 0;
}

int qcow2_lookup_span(qcow2_image *img, uint64_t guest_offset,
                      uint64_t max_len, qcow2_run *run)
{
    uint32_t sc_count = subclusters_per_cluster(img);
    uint64_t in_cluster = guest_offset & (img->cluster_size - 1);
    uint64_t table_span = img->l2_entries << img->cluster_bits;
    uint64_t table_left, limit, length;
    uint32_t sc_index, same;
    l2_position pos;
    cluster_desc desc;
    file_ends ends;
    uint8_t *table;
    const char *why;
    int rc;

    memset(run, 0, sizeof *run);
    run->guest_offset = guest_offset;
    locate(img, guest_offset, &pos);
    table_left = ((img->l2_entries - pos.l2_index) << img->cluster_bits) -
                 in_cluster;
    limit = min_u64(max_len, table_left);

    rc = l1_entry_table(img, pos.l1_index, guest_offset, &pos.l2_offset,
                        &ends);
    if (rc == 0 && pos.l2_offset != 0)
        rc = qcow2_l2_cache_get(img, pos.l2_offset, &table);
    if (rc < 0)
        return corrupt_run(rc, pos.l1_index * table_span, table_span,
                           max_len, run);
    if (pos.l2_offset == 0) {
        unallocated_run(img, &pos, limit, max_len, run);
        return 0;
    }
    why = decode_entry(img, &ends, table, pos.l2_index,
                       guest_offset - in_cluster, &desc);
    if (why)
        return corrupt_run(fail_entry(img, &pos, &desc, why),
                           guest_offset - in_cluster, img->cluster_size,
                           max_len, run);

    if (desc.compressed) {
        run->type = SC_COMPRESSED;
        run->length = min_u64(limit, img->cluster_size - in_cluster);
        run->host_offset = desc.coffset;
        run->compressed_size = desc.csize;
        run->cluster_offset = guest_offset - in_cluster;
        return 0;
    }
    sc_index = (uint32_t)(in_cluster >> img->subcluster_bits);
    run->type = sc_type_at(&desc, sc_index);
    if (sc_type_has_host(run->type))
        run->host_offset = desc.host_cluster + in_cluster;
    same = sc_same_count(&desc, sc_index, sc_count);
    length = ((uint64_t)(sc_index + same) << img->subcluster_bits) -
             in_cluster;
    if (sc_index + same == sc_count)
        length = extend_run(img, &ends, table, &pos, run, length, limit);
    run->length = min_u64(length, limit);
    return 0;
}

int qcow2_lookup_run(qcow2_image *img, uint64_t guest_offset,
                     uint64_t max_len, qcow2_run *run)
{
    int rc = qcow2_lookup_span(img, guest_offset, max_len, run);

    /* the reason is already the handle's message */
    return rc == 0 && run->type == SC_CORRUPT ? QCOW2_E_CORRUPT : rc;
}

/* ---- Inspection ------------------------------------------------------------ */

static int l2_table_work(qcow2_image *img, uint32_t l1_index, uint64_t *out,
                         size_t *count)
{
    uint64_t l2_offset, words, guest_offset;
    file_ends ends;
    uint8_t *table;
    int rc;

    *count = 0;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "a raw image has no L2 tables");
    if (l1_index >= img->l1_size)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "L1 index %" PRIu32 " is past the L1 table (%"
                          PRIu32 " entries)", l1_index, img->l1_size);
    /* The guest offset the entry maps, for messages. */
    guest_offset = ((uint64_t)l1_index << (img->l2_bits + img->cluster_bits));
    rc = l1_entry_table(img, l1_index, guest_offset, &l2_offset, &ends);
    if (rc < 0 || l2_offset == 0)
        return rc;
    rc = qcow2_l2_cache_get(img, l2_offset, &table);
    if (rc < 0)
        return rc;
    words = img->cluster_size / 8;
    for (uint64_t i = 0; i < words; i++)
        out[i] = be64(table + i * 8);
    *count = (size_t)words;
    return 0;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_l2_table(qcow2_image *img, uint32_t l1_index, uint64_t *out,
                   size_t *count)
{
    int rc = qcow2_meta_flush(img);

    return rc < 0 ? rc : l2_table_work(img, l1_index, out, count);
}
