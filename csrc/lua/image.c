/*
 * lua-qcow2 binding: the Image userdata ("qcow2.Image").
 *
 * A handle's userdata outlives the engine handle (liolib's discipline):
 * after close the pointer inside is NULL and every use raises "attempt to
 * use a closed image". Backing images and snapshot views borrow from the
 * image they came from; see enum ql_kind in common.h.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

#include "common.h"


/* ---- Handle lifetime ------------------------------------------------------- */

ql_image *ql_image_alloc(lua_State *L, int kind, int from_idx)
{
    ql_image *q;

    if (from_idx != 0)
        from_idx = lua_absindex(L, from_idx);
    q = lua_newuserdatauv(L, sizeof *q, 2);
    memset(q, 0, sizeof *q);
    q->kind = kind;
    if (from_idx != 0) {
        q->from = lua_touserdata(L, from_idx);
        lua_pushvalue(L, from_idx);
        lua_setiuservalue(L, -2, QL_UV_FROM);
    }
    luaL_setmetatable(L, QL_IMAGE);
    return q;
}

/* The handle that owns the engine chain q's handle lives in: closing it
 * frees q's engine handle too. */
static ql_image *chain_owner(ql_image *q)
{
    while (q->kind == QL_BACKING && q->from)
        q = q->from;
    return q;
}

static void view_unlink(ql_image *q)
{
    if (q->prev_view) {
        *q->prev_view = q->next_view;
        if (q->next_view)
            q->next_view->prev_view = q->prev_view;
        q->prev_view = NULL;
        q->next_view = NULL;
    }
}

void ql_image_attach(ql_image *q, qcow2_image *h)
{
    q->img = h;
    if (q->kind == QL_VIEW && q->from) {
        /* The view borrows the file of its parent's chain: the chain's
         * owner closes it first. */
        ql_image *owner = chain_owner(q->from);
        q->next_view = owner->views;
        if (owner->views)
            owner->views->prev_view = &q->next_view;
        owner->views = q;
        q->prev_view = &owner->views;
    }
}

int ql_image_live(const ql_image *q)
{
    /* A borrowed backing handle is usable while every image it came from
     * is: their close released it inside the engine. */
    for (; q != NULL; q = q->from) {
        if (q->img == NULL)
            return 0;
        if (q->kind != QL_BACKING)
            return 1;
    }
    return 0;
}

void ql_image_close(ql_image *q)
{
    if (q->kind == QL_BACKING) {
        /* Borrowed: the engine frees it with the top of the chain. */
        q->img = NULL;
        return;
    }
    while (q->views)
        ql_image_close(q->views);   /* unlinks itself */
    if (q->img) {
        qcow2_close(q->img);
        q->img = NULL;
    }
    view_unlink(q);
}

ql_image *ql_to_image(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, QL_IMAGE);
}

ql_image *ql_check_image(lua_State *L, int idx)
{
    ql_image *q = ql_to_image(L, idx);
    if (!ql_image_live(q)) {
        q->img = NULL;
        luaL_error(L, "attempt to use a closed image");
    }
    return q;
}

/* ---- Fields --------------------------------------------------------------------- */

static int image_fields(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    qcow2_image *h = q->img;
    int is_qcow2 = qcow2_version(h) != 0;
    const char *key;

    if (lua_type(L, 2) != LUA_TSTRING) {
        lua_pushnil(L);
        return 1;
    }
    key = lua_tostring(L, 2);
    if (strcmp(key, "size") == 0)
        ql_push_u64(L, qcow2_virtual_size(h));
    else if (strcmp(key, "cluster_size") == 0 && is_qcow2)
        ql_push_u64(L, qcow2_cluster_size(h));
    else if (strcmp(key, "version") == 0 && is_qcow2)
        lua_pushinteger(L, qcow2_version(h));
    else if (strcmp(key, "read_only") == 0)
        lua_pushboolean(L, qcow2_is_read_only(h));
    else if (strcmp(key, "path") == 0)
        lua_pushstring(L, qcow2_path(h));
    else if (strcmp(key, "format") == 0)
        lua_pushstring(L, qcow2_format(h));
    else if (strcmp(key, "backing_file") == 0)
        lua_pushstring(L, qcow2_backing_name(h));   /* NULL -> nil */
    else if (strcmp(key, "backing_format") == 0)
        lua_pushstring(L, qcow2_backing_format(h));
    else
        lua_pushnil(L);
    return 1;
}

/* ---- Guest data ------------------------------------------------------------------ */

static int image_read(lua_State *L)
{
    uint64_t offset = ql_check_offset(L, 2);
    uint64_t length = ql_check_length(L, 3);
    ql_image *q = ql_check_image(L, 1);
    uint64_t guest_offset, bytes;
    char *dst;
    int rc;

    if (!ql_clamp_range(L, qcow2_path(q->img), "read", offset, length,
                        qcow2_virtual_size(q->img), &guest_offset, &bytes))
        return 3;
    if (bytes == 0) {
        lua_pushliteral(L, "");
        return 1;
    }
    /* Allocation failure is nil, message, "nomem" (result.c). */
    dst = ql_result_alloc(L, qcow2_path(q->img), (size_t)bytes, &rc);
    if (dst == NULL)
        return rc;
    rc = qcow2_read(q->img, guest_offset, dst, (size_t)bytes);
    if (rc < 0) {
        free(dst);
        return ql_push_engine_error(L, q->img, rc);
    }
    return ql_result_push(L, qcow2_path(q->img), dst, (size_t)bytes);
}

/* ---- info() --------------------------------------------------------------------- */

/* full-backing-filename as qemu-img info prints it: the name combined with
 * the image's folder (bdrv_get_full_backing_filename / path_combine). */
static void push_full_backing_name(lua_State *L, const char *image_path,
                                   const char *backing)
{
    const char *slash;

    if (backing[0] == '/' || qcow2_has_protocol(backing)) {
        lua_pushstring(L, backing);
        return;
    }
    slash = strrchr(image_path, '/');
    if (slash)
        lua_pushlstring(L, image_path, (size_t)(slash + 1 - image_path));
    else
        lua_pushliteral(L, "");
    lua_pushstring(L, backing);
    lua_concat(L, 2);
}

/* "bitmaps" of format-specific data, as qemu-img info lists them; absent
 * when there are none or the directory cannot be read (the read itself
 * reports that through img:bitmaps()). */
static void push_bitmaps(lua_State *L, qcow2_image *h)
{
    qcow2_bitmap_info *list;
    size_t count;

    if (qcow2_bitmap_list(h, &list, &count) < 0 || count == 0)
        return;
    lua_createtable(L, (int)count, 0);
    for (size_t i = 0; i < count; i++) {
        int n = 0;

        lua_createtable(L, 0, 3);
        ql_set_str(L, "name", list[i].name);
        ql_set_int(L, "granularity", list[i].granularity);
        lua_createtable(L, 2, 0);
        if (list[i].flags & QCOW2_BITMAP_IN_USE) {
            lua_pushliteral(L, "in-use");
            lua_rawseti(L, -2, ++n);
        }
        if (list[i].flags & QCOW2_BITMAP_AUTO) {
            lua_pushliteral(L, "auto");
            lua_rawseti(L, -2, ++n);
        }
        lua_setfield(L, -2, "flags");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    qcow2_bitmap_list_free(list, count);
    lua_setfield(L, -2, "bitmaps");
}

/* "encrypt" as qemu-img info shows it (never the key). AES adds
 * "verified": false: nothing in the image checks its key. */
static void push_encrypt(lua_State *L, qcow2_image *h,
                         const qcow2_header *hdr)
{
    qcow2_encrypt_info e;
    int luks = hdr->crypt_method == QCOW2_CRYPT_LUKS;

    lua_createtable(L, 0, 10);
    ql_set_str(L, "format", luks ? "luks" : "aes");
    if (!luks)
        ql_set_bool(L, "verified", 0);
    if (!luks || qcow2_get_encrypt_info(h, &e) < 0 || !e.cipher_alg[0])
        return;
    ql_set_str(L, "cipher-alg", e.cipher_alg);
    ql_set_str(L, "cipher-mode", e.cipher_mode);
    if (e.ivgen_alg[0])
        ql_set_str(L, "ivgen-alg", e.ivgen_alg);
    if (e.ivgen_hash_alg[0])
        ql_set_str(L, "ivgen-hash-alg", e.ivgen_hash_alg);
    ql_set_str(L, "hash-alg", e.hash_alg);
    ql_set_str(L, "uuid", e.uuid);
    ql_set_int(L, "payload-offset", e.payload_offset);
    ql_set_int(L, "master-key-iters", e.master_key_iters);
    lua_createtable(L, 8, 0);
    for (int i = 0; i < 8; i++) {
        lua_createtable(L, 0, 4);
        ql_set_bool(L, "active", e.slots[i].active);
        ql_set_int(L, "key-offset", e.slots[i].key_offset);
        if (e.slots[i].active) {
            ql_set_int(L, "iters", e.slots[i].iters);
            ql_set_int(L, "stripes", e.slots[i].stripes);
        }
        lua_rawseti(L, -2, i + 1);
    }
    lua_setfield(L, -2, "slots");
}

/* "format-specific" of qemu-img info for a qcow2 image (QEMU 7.2's
 * qcow2_get_specific_info). */
static void push_format_specific(lua_State *L, qcow2_image *h,
                                 const qcow2_header *hdr)
{
    const qcow2_ext_info *ext = qcow2_get_ext_info(h);

    lua_createtable(L, 0, 2);
    ql_set_str(L, "type", "qcow2");
    lua_createtable(L, 0, 8);
    ql_set_str(L, "compression-type",
               hdr->compression_type == QCOW2_COMPRESSION_ZSTD ? "zstd"
                                                                : "zlib");
    ql_set_int(L, "refcount-bits", (uint64_t)1 << hdr->refcount_order);
    if (hdr->version == 2) {
        ql_set_str(L, "compat", "0.10");
    } else {
        ql_set_str(L, "compat", "1.1");
        ql_set_bool(L, "lazy-refcounts",
                    (hdr->compatible_features &
                     QCOW2_COMPAT_LAZY_REFCOUNTS) != 0);
        ql_set_bool(L, "corrupt",
                    (hdr->incompatible_features &
                     QCOW2_INCOMPAT_CORRUPT) != 0);
        ql_set_bool(L, "extended-l2",
                    (hdr->incompatible_features &
                     QCOW2_INCOMPAT_EXTL2) != 0);
        if (ext && ext->data_file)
            ql_set_str(L, "data-file", ext->data_file);
        /* QEMU prints data-file-raw whenever an external data file is in
         * use (incompatible bit 2); its value is autoclear bit 1. */
        if (hdr->incompatible_features & QCOW2_INCOMPAT_DATA_FILE)
            ql_set_bool(L, "data-file-raw",
                        (hdr->autoclear_features &
                         QCOW2_AUTOCLEAR_DATA_FILE_RAW) != 0);
        push_bitmaps(L, h);
    }
    if (hdr->crypt_method != QCOW2_CRYPT_NONE) {
        push_encrypt(L, h, hdr);
        lua_setfield(L, -2, "encrypt");
    }
    lua_setfield(L, -2, "data");
}

static int push_snapshot_infos(lua_State *L, qcow2_image *h, uint32_t count)
{
    lua_createtable(L, (int)count, 0);
    for (uint32_t i = 0; i < count; i++) {
        qcow2_snapshot_info sn;
        int rc = qcow2_snapshot_get(h, i, &sn);
        if (rc < 0)
            return rc;
        lua_createtable(L, 0, 8);
        ql_set_str(L, "id", sn.id);
        ql_set_str(L, "name", sn.name);
        ql_set_int(L, "date-sec", sn.date_sec);
        ql_set_int(L, "date-nsec", sn.date_nsec);
        ql_set_int(L, "vm-clock-sec", sn.vm_clock_nsec / 1000000000u);
        ql_set_int(L, "vm-clock-nsec", sn.vm_clock_nsec % 1000000000u);
        ql_set_int(L, "vm-state-size", sn.vm_state_size);
        /* QEMU omits icount when the entry has none (-1). */
        if (sn.has_icount && sn.icount != -1)
            ql_set_int(L, "icount", (uint64_t)sn.icount);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 0;
}

static int image_info(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    qcow2_image *h = q->img;
    const qcow2_header *hdr = qcow2_get_header(h);
    const char *backing = qcow2_backing_name(h);
    const char *backing_format = qcow2_backing_format(h);
    uint32_t nb_snapshots = qcow2_snapshot_count(h);
    uint64_t allocated;
    int rc;

    lua_createtable(L, 0, 12);
    /* QEMU counts a raw file's size in whole 512-byte sectors.
     * TODO(engine): qcow2_virtual_size of a raw image should round the
     * same way, so that img.size, read and map agree with this. */
    ql_set_int(L, "virtual-size",
               hdr ? qcow2_virtual_size(h)
                   : (qcow2_virtual_size(h) + 511) / 512 * 512);
    ql_set_str(L, "filename", qcow2_path(h));
    ql_set_str(L, "format", qcow2_format(h));
    /* qemu-img leaves actual-size out when the size is unknown. */
    if (qcow2_allocated_file_size(h, &allocated) == 0)
        ql_set_int(L, "actual-size", allocated);
    ql_set_bool(L, "dirty-flag",
                hdr && (hdr->incompatible_features &
                        QCOW2_INCOMPAT_DIRTY) != 0);
    if (hdr) {
        ql_set_int(L, "cluster-size", qcow2_cluster_size(h));
        push_format_specific(L, h, hdr);
        lua_setfield(L, -2, "format-specific");
        if (hdr->crypt_method != QCOW2_CRYPT_NONE)
            ql_set_bool(L, "encrypted", 1);
    }
    if (backing) {
        ql_set_str(L, "backing-filename", backing);
        push_full_backing_name(L, qcow2_path(h), backing);
        lua_setfield(L, -2, "full-backing-filename");
        if (backing_format)
            ql_set_str(L, "backing-filename-format", backing_format);
    }
    if (nb_snapshots > 0) {
        rc = push_snapshot_infos(L, h, nb_snapshots);
        if (rc < 0)
            return ql_push_engine_error(L, h, rc);
        lua_setfield(L, -2, "snapshots");
    }
    /* Not in qemu-img's output: what a read-only open took that a strict
     * one refuses (a refcount or snapshot table outside the file, ...),
     * one line each. Absent on a healthy image, so the rest keeps
     * qemu-img's shape. */
    if (qcow2_open_damage_count(h) > 0) {
        size_t n = qcow2_open_damage_count(h);
        lua_createtable(L, (int)n, 0);
        for (size_t i = 0; i < n; i++) {
            lua_pushstring(L, qcow2_open_damage(h, i));
            lua_rawseti(L, -2, (lua_Integer)i + 1);
        }
        lua_setfield(L, -2, "damage");
    }
    return 1;
}

/* ---- header() ------------------------------------------------------------------- */

static void push_feature_names(lua_State *L, qcow2_image *h, int kind,
                               uint64_t bits)
{
    lua_Integer n = 0;

    lua_newtable(L);
    for (int bit = 0; bit < 64; bit++) {
        const char *name;
        if (!(bits & ((uint64_t)1 << bit)))
            continue;
        name = qcow2_feature_bit_name(h, kind, bit);
        if (name)
            lua_pushstring(L, name);
        else
            lua_pushfstring(L, "bit %d", bit);
        lua_rawseti(L, -2, ++n);
    }
}

/* header()'s snapshot-table facts: snapshot_table_size (bytes on disk,
 * padding after the last entry excluded, as QEMU counts it) and
 * snapshots, one {id=, name=, offset=, length=, extra_data_size=,
 * extra_data=} per entry in table order: the entry's host offset and
 * bytes, and its extra data as the raw bytes stored (a string; QEMU's
 * known part is vm_state_size, disk_size and icount, big-endian). */
static int push_snapshot_entries(lua_State *L, qcow2_image *h)
{
    uint32_t n = qcow2_snapshot_count(h);

    ql_set_int(L, "snapshot_table_size", qcow2_snapshot_table_size(h));
    lua_createtable(L, (int)n, 0);
    for (uint32_t i = 0; i < n; i++) {
        qcow2_snapshot_info sn;
        int rc = qcow2_snapshot_get(h, i, &sn);
        if (rc < 0) {
            lua_pop(L, 1);
            return rc;
        }
        lua_createtable(L, 0, 6);
        ql_set_str(L, "id", sn.id);
        ql_set_str(L, "name", sn.name);
        ql_set_int(L, "offset", sn.entry_offset);
        ql_set_int(L, "length", sn.entry_length);
        ql_set_int(L, "extra_data_size", sn.extra_data_size);
        lua_pushlstring(L, sn.extra_data ? (const char *)sn.extra_data : "",
                        sn.extra_data ? sn.extra_data_size : 0);
        lua_setfield(L, -2, "extra_data");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "snapshots");
    return 0;
}

static int image_header(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    qcow2_image *h = q->img;
    const qcow2_header *hdr = qcow2_get_header(h);
    size_t n_ext;
    int rc;

    if (hdr == NULL)
        return ql_push_fail(L, QCOW2_E_UNSUPPORTED,
                            "%s: a raw image has no qcow2 header",
                            qcow2_path(h));
    lua_createtable(L, 0, 22);
    ql_set_int(L, "magic", hdr->magic);
    ql_set_int(L, "version", hdr->version);
    ql_set_int(L, "backing_file_offset", hdr->backing_file_offset);
    ql_set_int(L, "backing_file_size", hdr->backing_file_size);
    ql_set_int(L, "cluster_bits", hdr->cluster_bits);
    ql_set_int(L, "size", hdr->size);
    ql_set_int(L, "crypt_method", hdr->crypt_method);
    ql_set_int(L, "l1_size", hdr->l1_size);
    ql_set_int(L, "l1_table_offset", hdr->l1_table_offset);
    ql_set_int(L, "refcount_table_offset", hdr->refcount_table_offset);
    ql_set_int(L, "refcount_table_clusters", hdr->refcount_table_clusters);
    ql_set_int(L, "nb_snapshots", hdr->nb_snapshots);
    ql_set_int(L, "snapshots_offset", hdr->snapshots_offset);
    /* v2 images: the engine fills QEMU's implied values (features 0,
     * refcount_order 4, header_length 72, compression_type 0). */
    ql_set_int(L, "incompatible_features", hdr->incompatible_features);
    ql_set_int(L, "compatible_features", hdr->compatible_features);
    ql_set_int(L, "autoclear_features", hdr->autoclear_features);
    ql_set_int(L, "refcount_order", hdr->refcount_order);
    ql_set_int(L, "header_length", hdr->header_length);
    ql_set_int(L, "compression_type", hdr->compression_type);

    n_ext = qcow2_extension_count(h);
    lua_createtable(L, (int)n_ext, 0);
    for (size_t i = 0; i < n_ext; i++) {
        const qcow2_header_extension *e = qcow2_extension(h, i);
        if (e == NULL)
            continue;
        lua_createtable(L, 0, 4);
        ql_set_int(L, "magic", e->magic);
        ql_set_int(L, "length", e->length);
        ql_set_int(L, "offset", e->file_offset);
        lua_pushlstring(L, (const char *)e->data, e->length);
        lua_setfield(L, -2, "data");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_setfield(L, -2, "extensions");

    rc = push_snapshot_entries(L, h);
    if (rc < 0)
        return ql_push_engine_error(L, h, rc);

    lua_createtable(L, 0, 3);
    push_feature_names(L, h, 0, hdr->incompatible_features);
    lua_setfield(L, -2, "incompatible");
    push_feature_names(L, h, 1, hdr->compatible_features);
    lua_setfield(L, -2, "compatible");
    push_feature_names(L, h, 2, hdr->autoclear_features);
    lua_setfield(L, -2, "autoclear");
    lua_setfield(L, -2, "features");
    return 1;
}

/* ---- Raw tables ------------------------------------------------------------------- */

/* img:l1(): the active L1 table's raw entries as a Lua array, so entry
 * i of the format's table (guest range i * L2 span) is l1()[i + 1].
 * Methods taking a table index (img:l2(i), img:refcount(c)) take the
 * format's index, from 0: img:l2(i) is the table l1()[i + 1] points at. */
static int image_l1(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    uint32_t n = qcow2_l1_size(q->img);

    lua_createtable(L, (int)n, 0);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t entry;
        int rc = qcow2_l1_entry(q->img, i, &entry);
        if (rc < 0)
            return ql_push_engine_error(L, q->img, rc);
        ql_push_u64(L, entry);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* img:l2(l1_index): the raw 64-bit words of the L2 table that L1 entry
 * l1_index (the format's index, from 0; l1()[l1_index + 1]) points at,
 * in file order.
 * With extended L2 that is a flat array of pairs: entry, then its
 * subcluster bitmap (words 2k+1 and 2k+2 describe cluster k). */
static int image_l2(lua_State *L)
{
    uint64_t l1_index = ql_check_index(L, 2);
    ql_image *q = ql_check_image(L, 1);
    uint64_t cluster_size = qcow2_cluster_size(q->img);
    uint64_t *words;
    size_t count = 0;
    int rc;

    if (cluster_size == 0)
        return ql_push_fail(L, QCOW2_E_UNSUPPORTED,
                            "%s: a raw image has no L2 tables",
                            qcow2_path(q->img));
    if (l1_index >= qcow2_l1_size(q->img))
        return ql_push_fail(L, QCOW2_E_INVALID,
                            "%s: L1 index %" PRIu64 " is outside the L1 "
                            "table (%" PRIu32 " entries)", qcow2_path(q->img),
                            l1_index, qcow2_l1_size(q->img));
    words = lua_newuserdatauv(L, (size_t)cluster_size, 0);
    rc = qcow2_l2_table(q->img, (uint32_t)l1_index, words, &count);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    if (count > cluster_size / 8)
        count = (size_t)(cluster_size / 8);
    lua_createtable(L, (int)count, 0);
    for (size_t i = 0; i < count; i++) {
        ql_push_u64(L, words[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

static int image_refcount(lua_State *L)
{
    uint64_t host_cluster = ql_check_index(L, 2);
    ql_image *q = ql_check_image(L, 1);
    uint64_t refcount;
    int rc;

    rc = qcow2_refcount(q->img, host_cluster, &refcount);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    ql_push_u64(L, refcount);
    return 1;
}

/* ---- Map, snapshots, backing --------------------------------------------------- */

static int image_map(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    uint64_t size = qcow2_virtual_size(q->img);
    uint64_t offset, length, guest_offset, bytes;

    ql_opt_range(L, 2, size, &offset, &length);
    if (!ql_clamp_range(L, qcow2_path(q->img), "map", offset, length, size,
                        &guest_offset, &bytes))
        return 3;
    return ql_map_push(L, q->img, guest_offset, bytes);
}

static int image_snapshots(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    uint32_t n = qcow2_snapshot_count(q->img);

    lua_createtable(L, (int)n, 0);
    for (uint32_t i = 0; i < n; i++) {
        qcow2_snapshot_info info;
        int rc = qcow2_snapshot_get(q->img, i, &info);
        if (rc < 0)
            return ql_push_engine_error(L, q->img, rc);
        ql_snapshot_push(L, 1, i, &info);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* img:snapshot(id_or_name): by id first, then by name, as QEMU's
 * bdrv_snapshot_find does; nil when neither matches. */
static int image_snapshot(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    const char *key = luaL_checkstring(L, 2);
    uint32_t n = qcow2_snapshot_count(q->img);
    qcow2_snapshot_info info;

    for (int by_name = 0; by_name <= 1; by_name++) {
        for (uint32_t i = 0; i < n; i++) {
            int rc = qcow2_snapshot_get(q->img, i, &info);
            const char *s;
            if (rc < 0)
                return ql_push_engine_error(L, q->img, rc);
            s = by_name ? info.name : info.id;
            if (s && strcmp(s, key) == 0) {
                ql_snapshot_push(L, 1, i, &info);
                return 1;
            }
        }
    }
    lua_pushnil(L);
    return 1;
}

/* img:backing(): the engine's open backing image, borrowed (the same
 * userdata on every call while it stays the chain's backing handle). */
static int image_backing(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    qcow2_image *backing = qcow2_backing(q->img);
    ql_image *b;

    if (backing == NULL) {
        lua_pushnil(L);
        return 1;
    }
    if (lua_getiuservalue(L, 1, QL_UV_BACKING) == LUA_TUSERDATA) {
        b = lua_touserdata(L, -1);
        if (b->img == backing)
            return 1;
    }
    lua_pop(L, 1);
    b = ql_image_alloc(L, QL_BACKING, 1);
    ql_image_attach(b, backing);
    lua_pushvalue(L, -1);
    lua_setiuservalue(L, 1, QL_UV_BACKING);
    return 1;
}

/* ---- Close and metamethods ------------------------------------------------------ */

static int image_close(lua_State *L)
{
    ql_image *q = ql_to_image(L, 1);
    int rc = 0;

    /* The write-back cache reaches the file here: a failure is the
     * caller's to know (the handle is released all the same, and the
     * image is left consistent, at worst with leaked clusters). */
    if (ql_image_live(q) && q->kind == QL_OWNED &&
        !qcow2_is_read_only(q->img))
        rc = qcow2_flush(q->img);
    if (rc < 0) {
        int n = ql_push_engine_error(L, q->img, rc);
        ql_image_close(q);
        return n;
    }
    ql_image_close(q);
    lua_pushboolean(L, 1);
    return 1;
}

/* __gc and __close: the same idempotent close; a borrowed backing handle
 * is left to the engine (its top image frees it). */
static int image_gc(lua_State *L)
{
    ql_image *q = ql_to_image(L, 1);
    if (q->kind != QL_BACKING)
        ql_image_close(q);
    return 0;
}

static int image_tostring(lua_State *L)
{
    ql_image *q = ql_to_image(L, 1);
    char size[32];

    if (!ql_image_live(q)) {
        lua_pushliteral(L, "qcow2.Image (closed)");
        return 1;
    }
    ql_human_size(size, sizeof size, qcow2_virtual_size(q->img));
    if (qcow2_version(q->img) != 0)
        lua_pushfstring(L, "qcow2.Image (%s, %s, v%d)",
                        ql_basename(qcow2_path(q->img)), size,
                        (int)qcow2_version(q->img));
    else
        lua_pushfstring(L, "qcow2.Image (%s, %s, %s)",
                        ql_basename(qcow2_path(q->img)), size,
                        qcow2_format(q->img));
    return 1;
}

void ql_image_register(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"read", image_read},
        {"info", image_info},
        {"header", image_header},
        {"map", image_map},
        {"snapshots", image_snapshots},
        {"snapshot", image_snapshot},
        {"backing", image_backing},
        {"l1", image_l1},
        {"l2", image_l2},
        {"refcount", image_refcount},
        {"close", image_close},
        {NULL, NULL}
    };
    /* Every Image method, from the files that implement them. */
    static const luaL_Reg *const all[] = {
        methods, ql_image_digest_methods, ql_image_write_methods,
        ql_image_check_methods,
        ql_image_snapshot_methods, ql_image_amend_methods,
        ql_image_diff_methods, ql_image_bitmap_methods,
        ql_image_convert_methods, ql_image_forensics_methods,
        ql_image_lifecycle_methods, NULL
    };
    static const luaL_Reg metamethods[] = {
        {"__gc", image_gc},
        {"__close", image_gc},
        {"__tostring", image_tostring},
        {NULL, NULL}
    };
    ql_register_type(L, QL_IMAGE, QL_METHODS_IMAGE, all, metamethods,
                     image_fields);
}
