/*
 * lua-qcow2 binding: the qcow2.core module (open, probe, version) and the
 * translation of open options into qcow2_open_opts.
 */
#include <stdio.h>
#include <string.h>

#include "common.h"

/* ---- Option helpers ------------------------------------------------------ */

/* Push opts[name]; raise unless it is nil or of type `type`. `fn` names
 * the function in the message ("open", "create"). Returns the Lua type
 * found (LUA_TNIL when absent). */
int ql_opt_field(lua_State *L, int opts, const char *fn, const char *name,
                 int type)
{
    int found = lua_getfield(L, opts, name);
    if (found != LUA_TNIL && found != type)
        luaL_error(L, "bad option '%s' to '%s' (%s expected, got %s)",
                   name, fn, lua_typename(L, type), luaL_typename(L, -1));
    return found;
}

/* A boolean option: -1 when absent, else 0 or 1. */
int ql_opt_bool(lua_State *L, int opts, const char *fn, const char *name)
{
    int value = -1;
    if (ql_opt_field(L, opts, fn, name, LUA_TBOOLEAN) != LUA_TNIL)
        value = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return value;
}

/* An integer option: 1 with *out set when given, 0 when absent. Raises
 * when it is not an integer, or is negative and `non_negative`. */
int ql_opt_integer(lua_State *L, int opts, const char *fn, const char *name,
                   int non_negative, lua_Integer *out)
{
    int given = 0;
    if (ql_opt_field(L, opts, fn, name, LUA_TNUMBER) != LUA_TNIL) {
        int is_int = 0;
        lua_Integer v = lua_tointegerx(L, -1, &is_int);
        if (!is_int || (non_negative && v < 0))
            luaL_error(L, "bad option '%s' to '%s' (%s expected)", name, fn,
                       non_negative ? "non-negative integer" : "integer");
        *out = v;
        given = 1;
    }
    lua_pop(L, 1);
    return given;
}

/* A byte count: a non-negative integer. Returns 1 when given. */
static int opt_bytes(lua_State *L, int opts, const char *name, uint64_t *out)
{
    lua_Integer v;
    if (!ql_opt_integer(L, opts, "open", name, 1, &v))
        return 0;
    *out = (uint64_t)v;
    return 1;
}

/* The index of a string option among `choices` (NULL terminated), -1
 * when absent; any other string raises. */
int ql_opt_choice(lua_State *L, int opts, const char *fn, const char *name,
                  const char *const choices[])
{
    int index = -1;
    if (ql_opt_field(L, opts, fn, name, LUA_TSTRING) != LUA_TNIL) {
        const char *value = lua_tostring(L, -1);
        for (int i = 0; choices[i] && index < 0; i++)
            if (strcmp(choices[i], value) == 0)
                index = i;
        if (index < 0)
            luaL_error(L, "bad option '%s' to '%s' (invalid value '%s')",
                       name, fn, value);
    }
    lua_pop(L, 1);
    return index;
}

/*
 * The `io` fault plan: {fail_after_writes = N, errno = "EIO" | "ENOSPC"},
 * {stop_after_writes = N, volatile = true | "all", seed = S},
 * {trace = true}. A test-only option, so it is strict: an unknown key, a
 * misplaced errno, volatile or seed raises, since a typo would otherwise
 * turn a fault test into one that injects nothing.
 */
void ql_opt_io(lua_State *L, int opts, const char *fn, qcow2_open_opts *o)
{
    static const char *const errnos[] = { "EIO", "ENOSPC", NULL };
    static const char *const known[] = {
        "fail_after_writes", "errno", "stop_after_writes", "volatile",
        "seed", "trace", NULL
    };
    lua_Integer n;
    int io, errno_index, trace, type;

    if (ql_opt_field(L, opts, fn, "io", LUA_TTABLE) == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    io = lua_gettop(L);
    lua_pushfstring(L, "%s' option 'io", fn);     /* names the table */
    ql_check_options(L, io, lua_tostring(L, -1), known);
    lua_pop(L, 1);
    if (ql_opt_integer(L, io, fn, "fail_after_writes", 1, &n))
        o->fail_after_writes = n;
    errno_index = ql_opt_choice(L, io, fn, "errno", errnos);
    if (errno_index >= 0 && o->fail_after_writes < 0)
        luaL_error(L, "bad option 'io' to '%s' (errno needs "
                   "fail_after_writes)", fn);
    o->fail_status = errno_index == 1 ? QCOW2_E_NOSPC : QCOW2_E_IO;
    if (ql_opt_integer(L, io, fn, "stop_after_writes", 1, &n))
        o->stop_after_writes = n;

    /* volatile: a boolean, or "all" (every unflushed write lost). */
    type = lua_getfield(L, io, "volatile");
    if (type == LUA_TBOOLEAN)
        o->volatile_cache = lua_toboolean(L, -1);
    else if (type == LUA_TSTRING && strcmp(lua_tostring(L, -1), "all") == 0)
        o->volatile_cache = 2;
    else if (type != LUA_TNIL)
        luaL_error(L, "bad option 'volatile' to '%s' (true, false or "
                   "\"all\" expected)", fn);
    lua_pop(L, 1);
    if (type != LUA_TNIL && o->stop_after_writes < 0)
        luaL_error(L, "bad option 'io' to '%s' (volatile needs "
                   "stop_after_writes)", fn);
    if (ql_opt_integer(L, io, fn, "seed", 0, &n)) {
        if (type == LUA_TNIL)
            luaL_error(L, "bad option 'io' to '%s' (seed needs volatile)",
                       fn);
        o->volatile_seed = (uint64_t)n;
    }

    trace = ql_opt_bool(L, io, fn, "trace");
    o->trace_writes = trace > 0;
    lua_pop(L, 1);
}

/* The `cache` option of open and create. */
const char *const ql_cache_modes[] = {
    "writeback", "writethrough", "unsafe", NULL
};

/* ---- Backing resolver ----------------------------------------------------- */

typedef struct resolve_ctx {
    lua_State *L;
    int fn_idx;         /* stack index of the Lua resolve function */
} resolve_ctx;

/* Runs inside lua_pcall: fn, name, format (light userdata), depth. Makes
 * the strings here, so a memory error is caught by the pcall and never
 * unwinds through the engine. */
static int resolve_call(lua_State *L)
{
    const char *name = lua_touserdata(L, 2);
    const char *format = lua_touserdata(L, 3);

    lua_pushvalue(L, 1);
    lua_pushstring(L, name);
    if (format)
        lua_pushstring(L, format);
    else
        lua_pushnil(L);
    lua_pushvalue(L, 4);
    lua_call(L, 3, 2);
    return 2;
}

/* qcow2_resolve_fn calling opts.backing(name, format, depth): a string is
 * the path to open; nil, why (or a Lua error) refuses the backing file. */
static int resolve_backing(void *vctx, const char *name, const char *format,
                           int depth, char *out, size_t out_len, char *why,
                           size_t why_len)
{
    resolve_ctx *ctx = vctx;
    lua_State *L = ctx->L;
    int top = lua_gettop(L);

    if (!lua_checkstack(L, 8)) {
        snprintf(why, why_len, "resolver: Lua stack overflow");
        return QCOW2_E_NOMEM;
    }
    lua_pushcfunction(L, resolve_call);
    lua_pushvalue(L, ctx->fn_idx);
    lua_pushlightuserdata(L, (void *)name);
    lua_pushlightuserdata(L, (void *)format);
    lua_pushinteger(L, depth);
    if (lua_pcall(L, 4, 2, 0) != LUA_OK) {
        const char *err = lua_type(L, -1) == LUA_TSTRING
                              ? lua_tostring(L, -1)
                              : "(error object is not a string)";
        snprintf(why, why_len, "resolver failed: %s", err);
        lua_settop(L, top);
        return QCOW2_E_INVALID;
    }
    if (lua_type(L, -2) == LUA_TSTRING) {
        size_t len;
        const char *path = lua_tolstring(L, -2, &len);
        if (len == 0 || len >= out_len || strlen(path) != len) {
            snprintf(why, why_len, "resolver returned an unusable path");
            lua_settop(L, top);
            return QCOW2_E_INVALID;
        }
        memcpy(out, path, len + 1);
        lua_settop(L, top);
        return 0;
    }
    snprintf(why, why_len, "%s",
             lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1)
                                            : "refused by the resolver");
    lua_settop(L, top);
    return QCOW2_E_NOTFOUND;
}

/* ---- qcow2.open ------------------------------------------------------------- */

/*
 * Cache sizes as QEMU's read_cache_sizes combines them: cache_size is the
 * total; with one of l2/refcount given the other gets the rest; with
 * neither, L2 gets it (the engine caps it at what maps the whole disk).
 * Returns 1, or 0 with fail pushed.
 */
static int cache_sizes(lua_State *L, int opts, qcow2_open_opts *o)
{
    uint64_t total = 0, l2 = 0, refcount = 0;
    int has_total = opt_bytes(L, opts, "cache_size", &total);
    int has_l2 = opt_bytes(L, opts, "l2_cache_size", &l2);
    int has_refcount = opt_bytes(L, opts, "refcount_cache_size", &refcount);

    if (has_total) {
        if (has_l2 && has_refcount && l2 + refcount != total) {
            ql_push_fail(L, QCOW2_E_INVALID, "l2_cache_size + "
                         "refcount_cache_size must equal cache_size");
            return 0;
        }
        if ((has_l2 && l2 > total) || (has_refcount && refcount > total)) {
            ql_push_fail(L, QCOW2_E_INVALID, "l2_cache_size or "
                         "refcount_cache_size may not exceed cache_size");
            return 0;
        }
        if (has_l2 && !has_refcount)
            refcount = total - l2;
        else if (has_refcount && !has_l2)
            l2 = total - refcount;
        else if (!has_l2 && !has_refcount)
            l2 = total;
    }
    o->l2_cache_size = l2;
    o->refcount_cache_size = refcount;
    return 1;
}

/* qcow2.open(path [, opts]) -> Image | nil, message, code */
static int module_open(lua_State *L)
{
    static const char *const overlap_modes[] = {
        "none", "constant", "cached", "all", NULL
    };
    /* Every key open understands: a misspelt one ({moed = "rw"}) raises
     * instead of silently giving a read-only handle. */
    static const char *const keys[] = {
        "mode", "backing", "allow_raw", "key", "repair", "cache_size",
        "l2_cache_size", "refcount_cache_size", "lazy_refcounts",
        "overlap_check", "discard", "cache", "force_share", "io",
        "data_file", NULL
    };
    static const char *const modes[] = { "r", "rw", NULL };
    const char *path = luaL_checkstring(L, 1);
    qcow2_open_opts o;
    qcow2_error err;
    qcow2_image *h = NULL;
    resolve_ctx ctx = {L, 0};
    ql_image *q;
    int rc;

    qcow2_open_opts_init(&o);
    /* Strict by default: a file without the qcow2 magic is refused
     * ("invalid") unless the caller asks for raw images. */
    o.allow_raw = 0;
    lua_settop(L, 2);
    if (!lua_isnil(L, 2)) {
        luaL_checktype(L, 2, LUA_TTABLE);
        ql_check_options(L, 2, "open", keys);
        o.read_write = ql_opt_choice(L, 2, "open", "mode", modes) == 1;

        switch (lua_getfield(L, 2, "backing")) {
        case LUA_TNIL:
            lua_pop(L, 1);
            break;
        case LUA_TBOOLEAN:
            o.no_backing = !lua_toboolean(L, -1);
            lua_pop(L, 1);
            break;
        case LUA_TFUNCTION:
            /* Stays on the stack (index 3) while qcow2_open runs. */
            ctx.fn_idx = lua_gettop(L);
            o.resolve = resolve_backing;
            o.resolve_ctx = &ctx;
            break;
        default:
            return luaL_error(L, "bad option 'backing' to 'open' (boolean "
                              "or function expected, got %s)",
                              luaL_typename(L, -1));
        }

        o.allow_raw = ql_opt_bool(L, 2, "open", "allow_raw") > 0;
        /* qemu-img's -U: read-only opens only, as QEMU refuses it too. */
        o.force_share = ql_opt_bool(L, 2, "open", "force_share") > 0;
        if (o.force_share && o.read_write)
            return luaL_error(L, "bad option 'force_share' to 'open' "
                              "(read-only opens only)");
        if (!cache_sizes(L, 2, &o))
            return 3;

        /* key: a string. An image that is not encrypted ignores it, as
         * QEMU 7.2 ignores encrypt.key-secret there (qemu-io reads such an
         * image). The string stays referenced by opts (on the stack) for
         * the whole open; the engine keeps only derived keys. */
        if (ql_opt_field(L, 2, "open", "key", LUA_TSTRING) != LUA_TNIL)
            o.key = lua_tolstring(L, -1, &o.key_len);
        lua_pop(L, 1);
        /* cache: "writeback" (default), "writethrough" or "unsafe", in
         * the order of ql_cache_modes (the engine's cache_mode). */
        {
            int mode = ql_opt_choice(L, 2, "open", "cache", ql_cache_modes);
            o.cache_mode = mode < 0 ? 0 : mode;
        }

        /* QEMU's runtime options of read-write handles; a read-only
         * handle never writes, so they change nothing there. */
        o.repair = ql_opt_bool(L, 2, "open", "repair") > 0;
        o.lazy_refcounts = ql_opt_bool(L, 2, "open", "lazy_refcounts");
        o.overlap_check = ql_opt_choice(L, 2, "open", "overlap_check",
                                        overlap_modes);
        /* discard: a boolean, or QEMU's words for it. */
        if (lua_getfield(L, 2, "discard") == LUA_TBOOLEAN) {
            o.discard = lua_toboolean(L, -1);
            lua_pop(L, 1);
        } else {
            static const char *const discard_modes[] = {
                "ignore", "off", "unmap", "on", NULL
            };
            lua_pop(L, 1);
            o.discard = ql_opt_choice(L, 2, "open", "discard",
                                      discard_modes) >= 2;
        }
        ql_opt_io(L, 2, "open", &o);
        /* the top image's data file, as given (stays referenced by the
         * options table while qcow2_open runs) */
        if (ql_opt_field(L, 2, "open", "data_file", LUA_TSTRING) != LUA_TNIL)
            o.data_file = lua_tostring(L, -1);
        lua_pop(L, 1);
    }

    /* The userdata first: a memory error after qcow2_open would leak h. */
    q = ql_image_alloc(L, QL_OWNED, 0);
    memset(&err, 0, sizeof err);
    rc = qcow2_open(path, &o, &h, &err);
    if (rc < 0 || h == NULL) {
        if (err.code == 0)
            err.code = rc < 0 ? rc : QCOW2_E_IO;
        return ql_push_error(L, &err);
    }
    ql_image_attach(q, h);
    return 1;
}

/* qcow2.probe(path) -> "qcow2", version | "raw" | nil, message, code */
static int module_probe(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    uint32_t version = 0;
    qcow2_error err;
    const char *format;

    memset(&err, 0, sizeof err);
    format = qcow2_probe(path, &version, &err);
    if (format == NULL)
        return ql_push_error(L, &err);
    lua_pushstring(L, format);
    if (strcmp(format, "qcow2") == 0) {
        lua_pushinteger(L, version);
        return 2;
    }
    return 1;
}

int luaopen_qcow2_core(lua_State *L);

int luaopen_qcow2_core(lua_State *L)
{
    static const luaL_Reg functions[] = {
        {"open", module_open},
        {"probe", module_probe},
        {"create", ql_module_create},
        {NULL, NULL}
    };

    /* Each type registered once, with its whole method table. */
    ql_image_register(L);
    ql_snapshot_register(L);
    ql_map_register(L);
    ql_check_result_register(L);
    ql_bitmap_register(L);

    luaL_newlib(L, functions);
    luaL_setfuncs(L, ql_module_compare_functions, 0);
    lua_pushliteral(L, QCOW2_LIB_VERSION);
    lua_setfield(L, -2, "version");

    /* The method tables, for init.lua to extend in Lua (to_json, ...). */
    lua_createtable(L, 0, 4);
    lua_getfield(L, LUA_REGISTRYINDEX, QL_METHODS_IMAGE);
    lua_setfield(L, -2, "Image");
    lua_getfield(L, LUA_REGISTRYINDEX, QL_METHODS_SNAPSHOT);
    lua_setfield(L, -2, "Snapshot");
    lua_getfield(L, LUA_REGISTRYINDEX, QL_METHODS_MAP);
    lua_setfield(L, -2, "ClusterMap");
    lua_getfield(L, LUA_REGISTRYINDEX, QL_METHODS_CHECK);
    lua_setfield(L, -2, "CheckResult");
    lua_setfield(L, -2, "methods");
    return 1;
}
