/*
 * qemu-img amend and bdrv_make_empty (QEMU's qcow2_amend_options,
 * qcow2_downgrade, qcow2_expand_zero_clusters, make_completely_empty and
 * qcow2_make_empty): header settings changed in place, the version moved
 * up or down, an image emptied.
 */
#include <stdlib.h>
#include <string.h>

#include "chain_ops.h"

/* ---- Zero clusters before a downgrade -------------------------------------- */

/*
 * Version 2 has no zero flag. A plain zero cluster becomes unallocated
 * when nothing shows through from below (no backing file), else a fresh
 * cluster of zeroes; a preallocated one gets its zeroes written and loses
 * the flag. The table is changed in place: a table shared by several L1
 * tables (refcount n) makes each new data cluster shared n times as well,
 * and COPIED only when n is 1 (QEMU does the same). Order: refcount,
 * zeroes, barrier, then the table.
 */
static int expand_zeroes_in_l2(qcow2_image *img, uint64_t l2_offset,
                               uint8_t *table, const uint8_t *zeroes)
{
    uint64_t l2_refcount;
    int changed = 0, rc;

    rc = qcow2_refcount_get(img, l2_offset >> img->cluster_bits,
                            &l2_refcount);
    if (rc == 0)
        rc = qcow2_read_meta(img, l2_offset, table, img->cluster_size,
                             "L2 table");
    for (uint64_t i = 0; rc == 0 && i < img->l2_entries; i++) {
        uint64_t entry = be64(table + i * 8), host = entry & L2E_OFFSET_MASK;

        if ((entry & QCOW_OFLAG_COMPRESSED) || !(entry & QCOW_OFLAG_ZERO))
            continue;
        if (host == 0 && !img->backing_name) {
            put_be64(table + i * 8, 0);
            changed = 1;
            continue;
        }
        if (host == 0) {
            rc = qcow2_alloc_clusters(img, 1, &host);
            if (rc == 0 && l2_refcount > 1)
                rc = qcow2_refcount_update(img, host, img->cluster_size,
                                           (int64_t)l2_refcount - 1);
            if (rc == 0)
                rc = qcow2_barrier(img);
            entry = host | (l2_refcount == 1 ? QCOW_OFLAG_COPIED : 0);
        } else {
            entry &= ~QCOW_OFLAG_ZERO;
        }
        if (rc == 0)
            rc = qcow2_write_data(img, host, zeroes, img->cluster_size);
        put_be64(table + i * 8, entry);
        changed = 1;
    }
    if (rc == 0 && changed) {
        rc = qcow2_barrier(img);
        if (rc == 0)
            rc = qcow2_write_checked(img, OVERLAP_ACTIVE_L2 |
                                     OVERLAP_INACTIVE_L2, "l2", l2_offset,
                                     table, img->cluster_size);
        qcow2_l2_cache_drop(img->l2_cache, l2_offset);
    }
    return rc;
}

static int expand_zeroes_in_l1(qcow2_image *img, const uint64_t *l1,
                               uint32_t l1_size, uint8_t *table,
                               const uint8_t *zeroes)
{
    int rc = 0;

    for (uint32_t i = 0; rc == 0 && i < l1_size; i++) {
        uint64_t l2_offset = l1[i] & L1E_OFFSET_MASK;
        if (l2_offset)
            rc = expand_zeroes_in_l2(img, l2_offset, table, zeroes);
    }
    return rc;
}

static int expand_zero_clusters(qcow2_image *img)
{
    uint8_t *table = malloc((size_t)img->cluster_size);
    uint8_t *zeroes = calloc(1, (size_t)img->cluster_size);
    int rc = table && zeroes ? 0 : qcow2_fail(img, QCOW2_E_NOMEM,
                                              "out of memory");

    if (rc == 0)
        rc = expand_zeroes_in_l1(img, img->l1, img->l1_size, table, zeroes);
    for (uint32_t s = 0; rc == 0 && s < img->nb_snapshots; s++) {
        const qcow2_snapshot *sn = &img->snapshots[s];
        uint64_t *l1 = NULL;
        rc = qcow2_l1_load(img, sn->l1_table_offset, sn->l1_size,
                           "snapshot L1 table", &l1);
        if (rc == 0)
            rc = expand_zeroes_in_l1(img, l1, sn->l1_size, table, zeroes);
        free(l1);
    }
    free(table);
    free(zeroes);
    if (rc == 0)
        rc = qcow2_barrier(img);
    return rc;
}

/* ---- Version changes -------------------------------------------------------- */

/* Clear the dirty bit once everything is on disk (QEMU's
 * qcow2_mark_clean; refcounts are never deferred by this engine). */
static int mark_clean(qcow2_image *img)
{
    int rc = qcow2_barrier(img);

    if (rc == 0 && img->hdr.version >= 3 &&
        (img->hdr.incompatible_features & INCOMPAT_DIRTY))
        rc = qcow2_header_set_feature(img, 0, 0, 0);
    if (rc == 0)
        img->ws->dirty_on_disk = 0;
    return rc;
}

/* What version 2 cannot hold, refused before anything changes. */
static int check_downgrade(qcow2_image *img, int lazy_after)
{
    uint64_t incompat = img->hdr.incompatible_features & ~INCOMPAT_DIRTY;

    if (img->refcount_bits != 16)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "compat=0.10 requires "
                          "refcount_bits=16");
    if (qcow2_has_data_file(img))
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Cannot downgrade an "
                          "image with a data file");
    if (img->compression_type != COMPRESSION_ZLIB)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Cannot downgrade an "
                          "image with zstd compression type");
    if (incompat)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Cannot downgrade an "
                          "image with incompatible features 0x%llx set",
                          (unsigned long long)incompat);
    if (img->ext.has_bitmaps && img->ext.nb_bitmaps)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Cannot downgrade an "
                          "image with persistent bitmaps");
    /* Expanded zero clusters would be plaintext zeroes, read back as the
     * decryption of zeroes (garbage). */
    if (img->hdr.crypt_method != CRYPT_NONE)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Cannot downgrade an "
                          "encrypted image");
    if (lazy_after)
        return qcow2_fail(img, QCOW2_E_INVALID, "Lazy refcounts only "
                          "supported with compatibility level 1.1 and above "
                          "(use compat=1.1 or greater)");
    for (uint32_t i = 0; i < img->nb_snapshots; i++) {
        const qcow2_snapshot *sn = &img->snapshots[i];
        if (sn->vm_state_size > UINT32_MAX ||
            (sn->has_disk_size && sn->disk_size != img->hdr.size))
            return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "Internal snapshots "
                              "prevent downgrade of image");
    }
    return 0;
}

static int downgrade(qcow2_image *img)
{
    uint64_t compat = img->hdr.compatible_features;
    uint64_t autoclear = img->hdr.autoclear_features;
    int rc = mark_clean(img);

    if (rc == 0)
        rc = expand_zero_clusters(img);
    if (rc < 0)
        return rc;
    /* compatible and autoclear bits may simply go; lazy refcounts were
     * made safe by clearing the dirty bit */
    img->hdr.compatible_features = 0;
    img->hdr.autoclear_features = 0;
    img->hdr.version = 2;
    rc = qcow2_header_rewrite(img);
    if (rc < 0) {
        img->hdr.version = 3;
        img->hdr.compatible_features = compat;
        img->hdr.autoclear_features = autoclear;
        return rc;
    }
    img->hdr.refcount_order = 4;
    img->hdr.header_length = QCOW2_V2_HEADER_LENGTH;
    img->ws->lazy_refcounts = 0;
    return 0;
}

static int upgrade(qcow2_image *img)
{
    int rc;

    for (uint32_t i = 0; i < img->nb_snapshots; i++)
        if (img->snapshots[i].extra_data_size < 16)
            return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "snapshot %s has "
                              "no version 3 extra data; upgrading it is not "
                              "supported", img->snapshots[i].id);
    img->hdr.version = 3;
    img->hdr.incompatible_features = 0;
    img->hdr.compatible_features = 0;
    img->hdr.autoclear_features = 0;
    img->hdr.refcount_order = 4;
    img->hdr.header_length = 0;     /* rewrite picks QEMU's 112 */
    img->hdr.compression_type = 0;
    rc = qcow2_header_rewrite(img);
    if (rc < 0) {
        img->hdr.version = 2;
        img->hdr.header_length = QCOW2_V2_HEADER_LENGTH;
    }
    return rc;
}

/* ---- Backing file ------------------------------------------------------------- */

static int set_backing(qcow2_image *img, const qcow2_amend_opts *opts)
{
    char *old_name = img->backing_name, *old_format = img->backing_format_ext;
    const char *old_ext_format = img->ext.backing_format;
    char *name = NULL, *format = NULL;
    int rc;

    if (opts->backing_file && strlen(opts->backing_file) >
                              QCOW2_MAX_BACKING_NAME)
        return qcow2_fail(img, QCOW2_E_INVALID, "backing file name too "
                          "long");
    if (opts->backing_format && strlen(opts->backing_format) >
                                QCOW2_MAX_BACKING_FORMAT)
        return qcow2_fail(img, QCOW2_E_INVALID, "backing format name too "
                          "long");
    if (opts->backing_file)
        name = *opts->backing_file ? strdup(opts->backing_file) : NULL;
    else if (old_name)
        name = strdup(old_name);
    if (opts->backing_format)
        format = *opts->backing_format ? strdup(opts->backing_format) : NULL;
    else if (old_format && name)
        format = strdup(old_format);
    if ((!name && (opts->backing_file ? *opts->backing_file : old_name != NULL)) ||
        (!format && (opts->backing_format ? *opts->backing_format
                                          : old_format != NULL && name))) {
        free(name);
        free(format);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    if (format && !name) {
        free(format);
        return qcow2_fail(img, QCOW2_E_INVALID, "backing_format without "
                          "a backing file");
    }
    img->backing_name = name;
    img->backing_format_ext = format;
    img->ext.backing_format = format;
    rc = qcow2_header_rewrite(img);
    if (rc < 0) {
        img->backing_name = old_name;
        img->backing_format_ext = old_format;
        img->ext.backing_format = old_ext_format;
        free(name);
        free(format);
        return rc;
    }
    free(old_name);
    free(old_format);
    return 0;
}

static int set_backing_work(qcow2_image *img, const char *backing_file,
                            const char *backing_format)
{
    qcow2_amend_opts opts;

    qcow2_amend_opts_init(&opts);
    opts.backing_file = backing_file;
    opts.backing_format = backing_format;
    return set_backing(img, &opts);
}

/* ---- Lazy refcounts ------------------------------------------------------------ */

static int set_lazy_refcounts(qcow2_image *img, int on)
{
    int rc;

    if (on) {
        rc = qcow2_header_set_feature(img, 1, 0, 1);
        if (rc == 0)
            img->ws->lazy_refcounts = 1;
        return rc;
    }
    /* make the image clean first, then forbid lazy refcounts */
    rc = mark_clean(img);
    if (rc == 0)
        rc = qcow2_header_set_feature(img, 1, 0, 0);
    if (rc == 0)
        img->ws->lazy_refcounts = 0;
    return rc;
}

/* ---- qcow2_amend ---------------------------------------------------------------- */

void qcow2_amend_opts_init(qcow2_amend_opts *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->lazy_refcounts = -1;
}

static int amend_work(qcow2_image *img, const qcow2_amend_opts *opts)
{
    uint32_t old_version = img->hdr.version;
    uint32_t new_version = opts->version ? opts->version : old_version;
    int lazy_now = (img->hdr.compatible_features & COMPAT_LAZY_REFCOUNTS)
                   != 0 && old_version >= 3;
    int lazy = opts->lazy_refcounts < 0 ? lazy_now : opts->lazy_refcounts;
    int rc = qcow2_check_writable(img);

    if (rc < 0)
        return rc;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "a raw image has no "
                          "options to amend");
    if (new_version != 2 && new_version != 3)
        return qcow2_fail(img, QCOW2_E_INVALID, "Unknown compatibility "
                          "version %u", new_version);
    /* everything refusable is refused before the first change */
    if (new_version < old_version) {
        rc = check_downgrade(img, opts->lazy_refcounts > 0);
        if (rc < 0)
            return rc;
        lazy = 0;
    } else if (lazy && new_version < 3) {
        return qcow2_fail(img, QCOW2_E_INVALID, "Lazy refcounts only "
                          "supported with compatibility level 1.1 and above "
                          "(use compat=1.1 or greater)");
    }
    if ((rc = qcow2_flush(img)) < 0)
        return rc;

    if (new_version > old_version)
        rc = upgrade(img);
    else if (new_version < old_version)
        rc = downgrade(img);
    if (rc == 0 && (opts->backing_file || opts->backing_format))
        rc = set_backing(img, opts);
    if (rc == 0 && new_version >= 3 &&
        lazy != ((img->hdr.compatible_features & COMPAT_LAZY_REFCOUNTS) != 0))
        rc = set_lazy_refcounts(img, lazy);
    if (rc == 0 && opts->size && opts->size != img->hdr.size)
        rc = qcow2_resize(img, opts->size);
    if (rc == 0)
        rc = qcow2_flush(img);
    return rc;
}

/* ---- qcow2_make_empty ------------------------------------------------------------ */

/*
 * QEMU's make_completely_empty, for v3 images without snapshots: the
 * dirty bit first (the refcounts are about to be wrong), the old L1
 * zeroed, clusters 1.. zeroed, the header pointed at an empty refcount
 * table (cluster 1) and an empty L1 (cluster 3), cluster 2 hooked as the
 * first refcount block, the clusters in use allocated, the dirty bit
 * cleared and the file cut short. A crash midway leaves a dirty image
 * whose repair at open finds nothing referenced.
 */
static int make_completely_empty(qcow2_image *img, uint64_t l1_clusters)
{
    uint64_t cs = img->cluster_size, first;
    uint64_t reftable_entries = cs / 8;
    uint64_t *reftable = calloc((size_t)reftable_entries, sizeof *reftable);
    uint8_t *zeroes = calloc(1, (size_t)cs);
    uint8_t pointers[20], entry[8];
    int all = OVERLAP_ALL, rc = 0;

    if (!reftable || !zeroes) {
        free(reftable);
        free(zeroes);
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    }
    if (!(img->hdr.incompatible_features & INCOMPAT_DIRTY))
        rc = qcow2_header_set_feature(img, 0, 0, 1);
    if (rc == 0)
        img->ws->dirty_on_disk = 1;
    for (uint64_t c = 0; rc == 0 && c < l1_clusters; c++)
        rc = qcow2_write_checked(img, all, "l1",
                                 img->hdr.l1_table_offset + c * cs, zeroes,
                                 (size_t)cs);
    if (rc == 0)
        memset(img->l1, 0, (size_t)img->l1_size * 8);
    for (uint64_t c = 1; rc == 0 && c < 3 + l1_clusters; c++)
        rc = qcow2_write_checked(img, all, "empty", c * cs, zeroes,
                                 (size_t)cs);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc == 0) {
        put_be64(pointers, 3 * cs);
        put_be64(pointers + 8, cs);
        put_be32(pointers + 16, 1);
        rc = qcow2_write_checked(img, OVERLAP_HEADER, "header", 40, pointers,
                                 sizeof pointers);
    }
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        goto broken;
    img->hdr.l1_table_offset = 3 * cs;
    img->hdr.refcount_table_offset = cs;
    img->hdr.refcount_table_clusters = 1;
    free(img->reftable);
    img->reftable = reftable;
    img->reftable_entries = reftable_entries;
    reftable = NULL;

    put_be64(entry, 2 * cs);
    rc = qcow2_write_checked(img, OVERLAP_REFCOUNT_TABLE, "refcount_table",
                             cs, entry, sizeof entry);
    if (rc == 0)
        rc = qcow2_barrier(img);
    if (rc < 0)
        goto broken;
    img->reftable[0] = 2 * cs;
    img->ws->free_cluster_hint = 0;
    img->ws->free_byte_offset = 0;
    qcow2_l2_cache_drop_all(img->l2_cache);
    qcow2_refcount_cache_drop_all(img);     /* new refcount structure */
    if (img->codec)
        qcow2_codec_forget(img->codec);

    rc = qcow2_alloc_clusters(img, 3 + l1_clusters, &first);
    if (rc == 0 && first != 0)
        rc = qcow2_fail(img, QCOW2_E_CORRUPT, "First cluster in emptied "
                        "image is in use");
    if (rc == 0)
        rc = mark_clean(img);
    if (rc == 0)
        rc = img->io->ops->truncate(img->io, (3 + l1_clusters) * cs);
    if (rc < 0)
        goto broken;
    free(zeroes);
    return 0;

broken:
    /* as QEMU ejects the node: the handle is unusable, the file dirty */
    free(reftable);
    free(zeroes);
    return qcow2_poison(img, rc);
}

/* QEMU's fallback: every cluster of the disk discarded for good (entries
 * unallocated, so a backing file shows through again). */
static int discard_everything(qcow2_image *img)
{
    int rc = qcow2_begin_update(img);

    for (uint32_t i = 0; rc == 0 && i < img->l1_size; i++) {
        qcow2_l2_work work;
        if ((img->l1[i] & L1E_OFFSET_MASK) == 0)
            continue;
        rc = qcow2_l2_work_begin(img, i, &work);
        for (uint64_t j = 0; rc == 0 && j < img->l2_entries; j++) {
            qcow2_l2_desc old;
            rc = qcow2_l2_work_get(img, &work, j, &old);
            if (rc < 0 || (old.entry == 0 && old.bitmap == 0))
                continue;
            qcow2_l2_work_set(img, &work, j, 0, 0);
            if (old.compressed || old.has_host)
                qcow2_l2_work_release(&work, old.entry);
        }
        if (rc == 0)
            rc = qcow2_l2_work_commit(img, &work);
        qcow2_l2_work_end(&work);
    }
    if (rc == 0)
        rc = qcow2_flush(img);
    return rc;
}

static int make_empty_work(qcow2_image *img)
{
    uint64_t l1_clusters;
    int rc = qcow2_check_writable(img);

    if (rc < 0)
        return rc;
    if (img->is_raw)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "make_empty needs a "
                          "qcow2 image");
    rc = qcow2_flush(img);
    if (rc < 0)
        return rc;
    l1_clusters = div_round_up((uint64_t)img->l1_size * 8, img->cluster_size);
    if (img->hdr.version >= 3 && img->nb_snapshots == 0 &&
        !(img->ext.has_bitmaps && img->ext.nb_bitmaps) &&
        !img->ext.has_crypto_header && !qcow2_has_data_file(img) &&
        3 + l1_clusters <= img->refblock_entries)
        return make_completely_empty(img, l1_clusters);
    return discard_everything(img);
}

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_set_backing(qcow2_image *img, const char *backing_file,
                      const char *backing_format)
{
    QCOW2_HELD(img, set_backing_work(img, backing_file, backing_format));
}

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_amend(qcow2_image *img, const qcow2_amend_opts *opts)
{
    QCOW2_HELD(img, amend_work(img, opts));
}

/* Behind the caches: flushed first, written through meanwhile. */
int qcow2_make_empty(qcow2_image *img)
{
    QCOW2_HELD(img, make_empty_work(img));
}
