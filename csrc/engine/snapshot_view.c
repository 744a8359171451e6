/*
 * Read-only views of the disk at an internal snapshot (an operation,
 * layer 8): the parent's geometry and files borrowed, the snapshot's
 * size and L1 table (parsed by snapshot_table.c).
 */
#include <stdlib.h>
#include <string.h>

#include "ops.h"

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
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
        qcow2_handle_free(view);
        return NULL;
    }
    view->io = parent->io;
    view->data_io = parent->data_io;
    view->read_only = 1;
    view->is_snapshot_view = 1;
    view->depth = parent->depth;
    view->hdr = parent->hdr;
    view->hdr.size = qcow2_snapshot_disk_size(parent, sn);
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
    view->size = qcow2_snapshot_disk_size(parent, sn);
    view->compression_type = parent->compression_type;
    view->backing = parent->backing;
    view->crypto = parent->crypto;      /* shared: the parent's keys */
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

static int snapshot_open_work(qcow2_image *parent, uint32_t index,
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
        qcow2_handle_free(view);
        return ret;
    }
    view->l2_cache_bytes = qcow2_default_l2_cache_bytes(view);
    *out = view;
    return 0;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_snapshot_open(qcow2_image *parent, uint32_t index,
                        qcow2_image **out)
{
    int rc = qcow2_meta_flush(parent);

    return rc < 0 ? rc : snapshot_open_work(parent, index, out);
}
