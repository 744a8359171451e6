/*
 * lua-qcow2 binding: qcow2.compare(a, b [, opts]) and qcow2.measure(opts)
 * (engine: csrc/engine/compare.c, csrc/engine/measure.c).
 *
 * Images are given as paths or as open Images. A path is opened here
 * read-only with its backing chain, raw when it has no qcow2 magic (as
 * qemu-img probes), and closed before the call returns; an Image is used
 * as it is (its chain, or the snapshot of a view).
 */
#include <string.h>

#include "common.h"

/* The image at arg: an open Image, or a path opened read-only (its Image
 * pushed so that it lives as long as the call). NULL with fail pushed. */
static qcow2_image *image_arg(lua_State *L, int arg, const char *fn,
                              int *opened_idx)
{
    qcow2_open_opts o;
    qcow2_error err;
    qcow2_image *h = NULL;
    ql_image *q;
    int rc;

    *opened_idx = 0;
    if (lua_type(L, arg) != LUA_TSTRING) {
        if (!luaL_testudata(L, arg, QL_IMAGE))
            luaL_argerror(L, arg, lua_pushfstring(L, "path or Image "
                          "expected to '%s', got %s", fn,
                          luaL_typename(L, arg)));
        return ql_check_image(L, arg)->img;
    }
    qcow2_open_opts_init(&o);
    o.allow_raw = 1;
    q = ql_image_alloc(L, QL_OWNED, 0);
    memset(&err, 0, sizeof err);
    rc = qcow2_open(lua_tostring(L, arg), &o, &h, &err);
    if (rc < 0 || !h) {
        if (err.code == 0)
            err.code = rc < 0 ? rc : QCOW2_E_IO;
        ql_push_error(L, &err);
        return NULL;
    }
    ql_image_attach(q, h);
    *opened_idx = lua_gettop(L);
    return h;
}

static void close_opened(lua_State *L, int idx)
{
    if (idx)
        ql_image_close(ql_to_image(L, idx));
}

/*
 * qcow2.compare(a, b [, {strict = bool}]) -> true | false, offset, why |
 * nil, message, code. offset: the first differing sector's guest offset
 * (why "content"), the chunk where the block status differs (strict,
 * "status") or the smaller size (strict, "size").
 */
static int module_compare(lua_State *L)
{
    static const char *const keys[] = { "strict", NULL };
    static const char *const why[] = { "", "content", "size", "status" };
    int strict = 0, ia = 0, ib = 0, rc;
    qcow2_image *a, *b;
    uint64_t offset = 0;

    if (ql_opt_options(L, 3, "compare", keys))
        strict = ql_opt_bool(L, 3, "compare", "strict") > 0;
    if (lua_type(L, 1) != LUA_TSTRING)
        luaL_checkudata(L, 1, QL_IMAGE);
    if (lua_type(L, 2) != LUA_TSTRING)
        luaL_checkudata(L, 2, QL_IMAGE);
    lua_settop(L, 3);
    a = image_arg(L, 1, "compare", &ia);
    if (!a)
        return 3;
    b = image_arg(L, 2, "compare", &ib);
    if (!b) {
        close_opened(L, ia);
        return 3;
    }
    rc = qcow2_compare(a, b, strict, &offset);
    if (rc < 0) {
        ql_push_engine_error(L, a, rc);
        close_opened(L, ia);
        close_opened(L, ib);
        return 3;
    }
    close_opened(L, ia);
    close_opened(L, ib);
    if (rc == QCOW2_COMPARE_EQUAL) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushboolean(L, 0);
    ql_push_u64(L, offset);
    lua_pushstring(L, why[rc]);
    return 3;
}

/* ---- measure ------------------------------------------------------------------ */

static uint64_t opt_u64(lua_State *L, const char *name, uint64_t dflt)
{
    lua_Integer v;
    return ql_opt_integer(L, 1, "measure", name, 1, &v) ? (uint64_t)v : dflt;
}

static const char *opt_str(lua_State *L, const char *name)
{
    const char *s = NULL;
    if (ql_opt_field(L, 1, "measure", name, LUA_TSTRING) != LUA_TNIL)
        s = lua_tostring(L, -1);    /* opts (arg 1) keeps it alive */
    lua_pop(L, 1);
    return s;
}

/* version / compat: 2 or 3 (default 3); other values raise. */
static uint32_t read_version(lua_State *L)
{
    static const char *const compat_names[] = {
        "0.10", "v2", "1.1", "v3", NULL
    };
    lua_Integer version = 0;
    int compat = ql_opt_choice(L, 1, "measure", "compat", compat_names);

    if (ql_opt_integer(L, 1, "measure", "version", 0, &version) &&
        version != 2 && version != 3)
        luaL_error(L, "bad option 'version' to 'measure' (2 or 3 expected, "
                   "got %I)", version);
    if (version)
        return (uint32_t)version;
    return compat < 0 ? 3 : compat < 2 ? 2 : 3;
}

/*
 * qcow2.measure(opts) -> {required =, fully_allocated = [, bitmaps =]} |
 * nil, message, code. opts: the create options (size unless `from`),
 * `from` (a path or an Image) and `snapshot` (of from).
 */
static int module_measure(lua_State *L)
{
    static const char *const keys[] = {
        "size", "version", "compat", "cluster_size", "refcount_bits",
        "lazy_refcounts", "preallocation", "backing_file", "backing_format",
        "encrypt", "extended_l2", "compression_type", "data_file",
        "data_file_raw", "from", "snapshot", NULL
    };
    static const char *const prealloc_modes[] = {
        "off", "metadata", "falloc", "full", NULL
    };
    qcow2_create_opts o;
    qcow2_measure_result res;
    qcow2_error err;
    qcow2_image *from = NULL, *bitmaps_of = NULL;
    int opened = 0, view_idx = 0, has_size, prealloc, from_idx, rc;
    lua_Integer size = 0;
    const char *snapshot;

    luaL_checktype(L, 1, LUA_TTABLE);
    lua_settop(L, 1);
    ql_check_options(L, 1, "measure", keys);
    qcow2_create_opts_init(&o);
    has_size = ql_opt_integer(L, 1, "measure", "size", 1, &size);
    o.size = (uint64_t)size;
    o.version = read_version(L);
    o.cluster_size = opt_u64(L, "cluster_size", o.cluster_size);
    {
        uint64_t bits = opt_u64(L, "refcount_bits", o.refcount_bits);
        o.refcount_bits = bits > UINT32_MAX ? 3 : (uint32_t)bits;
    }
    o.extended_l2 = ql_opt_bool(L, 1, "measure", "extended_l2") > 0;
    prealloc = ql_opt_choice(L, 1, "measure", "preallocation",
                             prealloc_modes);
    o.preallocation = prealloc < 0 ? NULL : prealloc_modes[prealloc];
    o.backing_file = opt_str(L, "backing_file");
    /* Read and checked for their types; they do not change the sizes. */
    opt_str(L, "backing_format");
    opt_str(L, "compression_type");
    opt_str(L, "data_file");
    ql_opt_bool(L, 1, "measure", "lazy_refcounts");
    ql_opt_bool(L, 1, "measure", "data_file_raw");
    if (ql_opt_field(L, 1, "measure", "encrypt", LUA_TTABLE) != LUA_TNIL)
        return luaL_error(L, "bad option 'encrypt' to 'measure' (encrypted "
                          "images are not measured yet)");
    lua_pop(L, 1);
    snapshot = opt_str(L, "snapshot");

    lua_getfield(L, 1, "from");
    from_idx = lua_gettop(L);
    if (lua_isnil(L, from_idx)) {
        if (!has_size)
            return luaL_error(L, "bad option 'size' to 'measure' (size or "
                              "from expected)");
        if (snapshot)
            return luaL_error(L, "bad option 'snapshot' to 'measure' "
                              "(needs from)");
    } else {
        if (has_size)
            return luaL_error(L, "bad option 'size' to 'measure' (not "
                              "with from)");
        from = image_arg(L, from_idx, "measure", &opened);
        if (!from)
            return 3;
        if (opened)
            from_idx = opened;
        bitmaps_of = from;
        if (snapshot) {
            from = ql_snapshot_view(L, from_idx, snapshot);
            if (!from) {
                close_opened(L, opened);
                return 3;
            }
            view_idx = lua_gettop(L);
        }
    }
    memset(&err, 0, sizeof err);
    rc = qcow2_measure(&o, from, bitmaps_of, &res, &err);
    close_opened(L, view_idx);
    close_opened(L, opened);
    if (rc < 0) {
        if (err.code == 0)
            err.code = rc;
        return ql_push_error(L, &err);
    }
    lua_createtable(L, 0, 3);
    ql_set_int(L, "required", res.required);
    ql_set_int(L, "fully_allocated", res.fully_allocated);
    if (res.has_bitmaps)
        ql_set_int(L, "bitmaps", res.bitmaps);
    return 1;
}

const luaL_Reg ql_module_compare_functions[] = {
    {"compare", module_compare},
    {"measure", module_measure},
    {NULL, NULL}
};
