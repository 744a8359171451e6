/*
 * lua-qcow2 binding: img:amend(opts) and img:make_empty(), installed into
 * the Image methods by ql_amend_register (replacing image.c's stubs).
 * Read-only handles answer nil, message, "readonly"; options amend cannot
 * change answer "unsupported", bad values "invalid", as qemu-img amend
 * refuses them.
 */
#include <string.h>

#include "common.h"

static int refuse_readonly(lua_State *L, ql_image *q, const char *what)
{
    return ql_push_fail(L, QCOW2_E_READONLY, "%s: %s: the image is open "
                        "read-only", qcow2_path(q->img), what);
}

/* Options qemu-img amend only takes at creation: accepted when they say
 * what the image already is (QEMU compares too), refused otherwise. */
static int creation_only(lua_State *L, ql_image *q, const char *key)
{
    const qcow2_header *h = qcow2_get_header(q->img);
    int same = 0;

    if (strcmp(key, "cluster_size") == 0)
        same = lua_isinteger(L, -1) &&
               (uint64_t)lua_tointeger(L, -1) == qcow2_cluster_size(q->img);
    else if (strcmp(key, "refcount_bits") == 0)
        same = lua_isinteger(L, -1) &&
               lua_tointeger(L, -1) == (lua_Integer)1 << h->refcount_order;
    else if (strcmp(key, "extended_l2") == 0)
        same = lua_isboolean(L, -1) &&
               lua_toboolean(L, -1) ==
                   ((h->incompatible_features & (1u << 4)) != 0);
    else if (strcmp(key, "compression_type") == 0)
        same = lua_type(L, -1) == LUA_TSTRING &&
               strcmp(lua_tostring(L, -1),
                      h->compression_type ? "zstd" : "zlib") == 0;
    else if (strcmp(key, "encrypt") == 0)
        same = lua_isboolean(L, -1) &&
               lua_toboolean(L, -1) == (h->crypt_method != 0);
    if (same)
        return 0;
    return ql_push_fail(L, QCOW2_E_UNSUPPORTED, "%s: Cannot change %s with "
                        "amend (only supported for image creation)",
                        qcow2_path(q->img), key);
}

static int parse_version(lua_State *L, ql_image *q, uint32_t *version)
{
    if (lua_isinteger(L, -1) &&
        (lua_tointeger(L, -1) == 2 || lua_tointeger(L, -1) == 3)) {
        *version = (uint32_t)lua_tointeger(L, -1);
        return 0;
    }
    if (lua_type(L, -1) == LUA_TSTRING) {
        const char *s = lua_tostring(L, -1);
        if (strcmp(s, "0.10") == 0 || strcmp(s, "v2") == 0) {
            *version = 2;
            return 0;
        }
        if (strcmp(s, "1.1") == 0 || strcmp(s, "v3") == 0) {
            *version = 3;
            return 0;
        }
        return ql_push_fail(L, QCOW2_E_INVALID, "%s: Unknown compatibility "
                            "level %s", qcow2_path(q->img), s);
    }
    return ql_push_fail(L, QCOW2_E_INVALID, "%s: version must be 2 or 3",
                        qcow2_path(q->img));
}

/* img:amend{version=, compat=, lazy_refcounts=, backing_file=,
 * backing_format=, size=} -> true | nil, message, code */
static int image_amend(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    qcow2_amend_opts opts;
    int rc;

    luaL_checktype(L, 2, LUA_TTABLE);
    if (qcow2_is_read_only(q->img))
        return refuse_readonly(L, q, "amend");
    qcow2_amend_opts_init(&opts);
    lua_pushnil(L);
    while (lua_next(L, 2) != 0) {
        const char *key;
        if (lua_type(L, -2) != LUA_TSTRING)
            return luaL_argerror(L, 2, "option names must be strings");
        key = lua_tostring(L, -2);
        if (strcmp(key, "version") == 0 || strcmp(key, "compat") == 0) {
            if (parse_version(L, q, &opts.version) != 0)
                return 3;
        } else if (strcmp(key, "lazy_refcounts") == 0) {
            luaL_argcheck(L, lua_isboolean(L, -1), 2,
                          "lazy_refcounts must be a boolean");
            opts.lazy_refcounts = lua_toboolean(L, -1);
        } else if (strcmp(key, "backing_file") == 0) {
            luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2,
                          "backing_file must be a string");
            opts.backing_file = lua_tostring(L, -1);
        } else if (strcmp(key, "backing_format") == 0) {
            luaL_argcheck(L, lua_type(L, -1) == LUA_TSTRING, 2,
                          "backing_format must be a string");
            opts.backing_format = lua_tostring(L, -1);
        } else if (strcmp(key, "size") == 0) {
            if (!lua_isinteger(L, -1) || lua_tointeger(L, -1) <= 0)
                return ql_push_fail(L, QCOW2_E_INVALID, "%s: size must be "
                                    "a positive integer", qcow2_path(q->img));
            opts.size = (uint64_t)lua_tointeger(L, -1);
        } else if (strcmp(key, "preallocation") == 0) {
            return ql_push_fail(L, QCOW2_E_UNSUPPORTED, "%s: Cannot change "
                                "preallocation mode", qcow2_path(q->img));
        } else if (strcmp(key, "cluster_size") == 0 ||
                   strcmp(key, "refcount_bits") == 0 ||
                   strcmp(key, "extended_l2") == 0 ||
                   strcmp(key, "compression_type") == 0 ||
                   strcmp(key, "encrypt") == 0 ||
                   strcmp(key, "data_file") == 0 ||
                   strcmp(key, "data_file_raw") == 0) {
            if (creation_only(L, q, key) != 0)
                return 3;
        } else {
            return ql_push_fail(L, QCOW2_E_INVALID, "%s: Invalid parameter "
                                "'%s'", qcow2_path(q->img), key);
        }
        lua_pop(L, 1);
    }
    /* the strings stay referenced by the options table at index 2 */
    rc = qcow2_amend(q->img, &opts);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* img:make_empty() -> true | nil, message, code */
static int image_make_empty(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    int rc;

    if (qcow2_is_read_only(q->img))
        return refuse_readonly(L, q, "make_empty");
    rc = qcow2_make_empty(q->img);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

void ql_amend_register(lua_State *L)
{
    if (lua_getfield(L, LUA_REGISTRYINDEX, QL_METHODS_IMAGE) == LUA_TTABLE) {
        lua_pushcfunction(L, image_amend);
        lua_setfield(L, -2, "amend");
        lua_pushcfunction(L, image_make_empty);
        lua_setfield(L, -2, "make_empty");
    }
    lua_pop(L, 1);
}
