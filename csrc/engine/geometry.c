/*
 * Image geometry derived from three header fields (cluster_bits, the
 * extended-L2 bit, refcount_order): one derivation for the open path
 * (header.c) and for create.c's bootstrap handle, so the two cannot
 * drift apart.
 */
#include "format.h"

uint32_t qcow2_l2_bits_for(uint32_t cluster_bits, int extended_l2)
{
    /* An L2 table is one cluster of 8-byte (16 with extended L2) entries. */
    return cluster_bits - (extended_l2 ? 4 : 3);
}

void qcow2_geometry_set(qcow2_image *img, uint32_t cluster_bits,
                        int extended_l2, uint32_t refcount_order)
{
    img->cluster_bits = cluster_bits;
    img->cluster_size = 1ull << cluster_bits;
    img->extended_l2 = extended_l2 != 0;
    img->l2_entry_bytes = img->extended_l2 ? 16 : 8;
    img->l2_bits = qcow2_l2_bits_for(cluster_bits, img->extended_l2);
    img->l2_entries = 1ull << img->l2_bits;
    /* 32 subclusters per cluster with extended L2, else one. */
    img->subcluster_bits = cluster_bits - (img->extended_l2 ? 5 : 0);
    img->subcluster_size = 1ull << img->subcluster_bits;
    /* the caller bounded refcount_order (QCOW2_REFCOUNT_ORDER_MAX): there
     * is a codec for it, chosen here once for the handle */
    img->refcount_codec = qcow2_refcount_codec_for(refcount_order);
    img->refcount_bits = img->refcount_codec->bits;
    img->refblock_entries = img->cluster_size * 8 / img->refcount_bits;
}

uint64_t qcow2_l1_entries_for(uint32_t cluster_bits, uint32_t l2_bits,
                              uint64_t size)
{
    /* One L1 entry maps one L2 table: l2_entries clusters of guest data. */
    uint32_t coverage_bits = cluster_bits + l2_bits;

    if (coverage_bits >= 64)
        return size != 0;
    return div_round_up(size, 1ull << coverage_bits);
}

int qcow2_l1_entries_needed(const qcow2_image *img, uint64_t size,
                            uint64_t *entries)
{
    *entries = qcow2_l1_entries_for(img->cluster_bits, img->l2_bits, size);
    return *entries > (uint64_t)INT32_MAX ? QCOW2_E_CORRUPT : 0;
}
