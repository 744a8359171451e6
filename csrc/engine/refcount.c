/*
 * Refcounts, read side: the refcount table (read whole at open) and
 * single refcounts or counts of used clusters, any width (entries are
 * decoded by the image's refcount codec, refcount_codec.c). The writers
 * are alloc.c, over refcount_scan.c.
 */
#include <stdlib.h>
#include <string.h>

#include "read_path.h"

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

/* The table is kept as read: an entry with reserved bits set is refused
 * when a lookup goes through it, not at open, as QEMU's check reports it. */
int qcow2_reftable_load(qcow2_image *img)
{
    uint64_t entries = ((uint64_t)img->hdr.refcount_table_clusters <<
                        img->cluster_bits) / 8;
    uint8_t *raw;
    int ret;

    /* header.c bounded it by QCOW2_MAX_REFTABLE_BYTES and the file size */
    if (entries * 8 > QCOW2_MAX_REFTABLE_BYTES)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "refcount table of %llu entries too large",
                          ull(entries));
    /* an empty table (an open for repair takes one) is one zero entry */
    raw = malloc((size_t)entries * 8 + 8);
    img->reftable = calloc((size_t)entries + 1, sizeof *img->reftable);
    if (!raw || !img->reftable) {
        free(raw);
        free(img->reftable);
        img->reftable = NULL;
        return qcow2_fail(img, QCOW2_E_NOMEM,
                          "out of memory for the refcount table");
    }
    /* a read-only open takes a table past the end of the file (header.c) */
    ret = qcow2_read_meta_lenient(img, img->hdr.refcount_table_offset, raw,
                          (size_t)entries * 8, "refcount table");
    if (ret == 0) {
        for (uint64_t i = 0; i < entries; i++)
            img->reftable[i] = be64(raw + i * 8);
        img->reftable_entries = entries;
    } else {
        free(img->reftable);
        img->reftable = NULL;
    }
    free(raw);
    return ret;
}

/*
 * The refcount block covering host_cluster: its offset (0 when the table
 * has no block there, all refcounts 0) and the entry index inside it.
 */
static int refcount_block_of(qcow2_image *img, uint64_t host_cluster,
                             uint64_t *refblock_offset,
                             uint64_t *refblock_index)
{
    uint64_t reftable_index = host_cluster / img->refblock_entries;
    uint64_t entry;

    *refblock_offset = 0;
    *refblock_index = host_cluster % img->refblock_entries;
    if (reftable_index >= img->reftable_entries)
        return 0;
    entry = img->reftable[reftable_index];
    if (entry & REFT_RESERVED_MASK)
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "refcount table entry %llu (0x%016llx) has "
                          "reserved bits set", ull(reftable_index),
                          ull(entry));
    entry &= REFT_OFFSET_MASK;
    if (entry == 0)
        return 0;
    if (!is_aligned(entry, img->cluster_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "refcount block offset 0x%llx in refcount table "
                          "entry %llu is not cluster aligned", ull(entry),
                          ull(reftable_index));
    /* A read-write handle grows its file: look at the size again before
     * calling a block outside it. */
    if (!range_inside(entry, img->cluster_size, img->file_size) && img->ws) {
        uint64_t now;
        if (img->io->ops->size(img->io, &now) == 0 && now > img->file_size)
            img->file_size = now;
    }
    if (!range_inside(entry, img->cluster_size, img->file_size))
        return qcow2_fail(img, QCOW2_E_CORRUPT,
                          "refcount block 0x%llx in refcount table entry "
                          "%llu lies outside the file (%llu bytes)",
                          ull(entry),
                          ull(reftable_index), ull(img->file_size));
    *refblock_offset = entry;
    return 0;
}

/*
 * Entry refblock_index of the block at refblock_offset: only the bytes
 * that hold it are read, through the refcount-block cache
 * (refcount_cache.c) when the handle keeps one.
 */
static int refcount_block_entry(qcow2_image *img, uint64_t refblock_offset,
                                uint64_t refblock_index, uint64_t *refcount)
{
    const qcow2_refcount_codec *codec = img->refcount_codec;
    uint8_t bytes[8];
    uint64_t byte_offset, first_in_bytes;
    size_t byte_len;
    int ret;

    qcow2_refcount_codec_bytes(codec, refblock_index, 1, &byte_offset,
                               &byte_len, &first_in_bytes);
    ret = qcow2_refcount_block_read(img, refblock_offset, byte_offset,
                                    bytes, byte_len);
    if (ret < 0)
        return ret;
    *refcount = codec->get(bytes, refblock_index - first_in_bytes);
    return 0;
}

static int refcount_work(qcow2_image *img, uint64_t host_cluster, uint64_t *out)
{
    uint64_t refblock_offset, refblock_index;
    int ret;

    *out = 0;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "a raw image has no refcounts");
    ret = refcount_block_of(img, host_cluster, &refblock_offset,
                            &refblock_index);
    if (ret < 0 || refblock_offset == 0)
        return ret;
    return refcount_block_entry(img, refblock_offset, refblock_index, out);
}

/* Non-zero entries among entries [0, count) of one refcount block image. */
static uint64_t count_nonzero_entries(const qcow2_refcount_codec *codec,
                                      const uint8_t *block, uint64_t count)
{
    uint64_t nonzero = 0;

    for (uint64_t i = 0; i < count; i++)
        nonzero += codec->get(block, i) != 0;
    return nonzero;
}

int qcow2_count_used_clusters(qcow2_image *img, uint64_t end_cluster,
                              uint64_t *out)
{
    uint8_t *block;
    int ret = 0;

    *out = 0;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_INVALID,
                          "a raw image has no refcounts");
    block = malloc(img->cluster_size);
    if (!block)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    /* One read per refcount block, not per cluster: map and info call
     * this over the whole file. */
    for (uint64_t first = 0; first < end_cluster;
         first += img->refblock_entries) {
        uint64_t refblock_offset, unused_index;
        uint64_t count = min_u64(img->refblock_entries, end_cluster - first);

        ret = refcount_block_of(img, first, &refblock_offset, &unused_index);
        if (ret < 0)
            break;
        if (refblock_offset == 0)
            continue;
        ret = qcow2_read_meta(img, refblock_offset, block, img->cluster_size,
                              "refcount block");
        if (ret < 0)
            break;
        *out += count_nonzero_entries(img->refcount_codec, block,
                                      count);
    }
    free(block);
    return ret;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_refcount(qcow2_image *img, uint64_t host_cluster, uint64_t *out)
{
    int rc = qcow2_meta_flush(img);

    return rc < 0 ? rc : refcount_work(img, host_cluster, out);
}
