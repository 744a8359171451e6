/*
 * lua-qcow2 binding: img:amend(opts) and img:make_empty(), listed in
 * ql_image_amend_methods for image.c to assemble into the Image methods.
 * Misuse raises (wrong types, unknown keys, unknown enumeration values,
 * negative sizes); read-only handles answer nil, message, "readonly";
 * options amend cannot change answer "unsupported", values the image
 * cannot take "invalid", as qemu-img amend refuses them.
 */
#include <string.h>

#include "common.h"

static int refuse_readonly(lua_State *L, ql_image *q, const char *what)
{
    return ql_push_fail(L, QCOW2_E_READONLY, "%s: %s: the image is open "
                        "read-only", qcow2_path(q->img), what);
}

#define FN "amend"

/* Options qemu-img amend only takes at creation: accepted when they say
 * what the image already is (QEMU compares too), refused otherwise. The
 * value (of a type already checked) is on top of the stack. */
static int creation_only_same(lua_State *L, ql_image *q, const char *key)
{
    const qcow2_header *h = qcow2_get_header(q->img);

    if (strcmp(key, "cluster_size") == 0)
        return (uint64_t)lua_tointeger(L, -1) == qcow2_cluster_size(q->img);
    if (strcmp(key, "refcount_bits") == 0)
        return lua_tointeger(L, -1) == (lua_Integer)1 << h->refcount_order;
    if (strcmp(key, "extended_l2") == 0)
        return lua_toboolean(L, -1) ==
               ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) != 0);
    if (strcmp(key, "compression_type") == 0)
        return strcmp(lua_tostring(L, -1),
                      h->compression_type == QCOW2_COMPRESSION_ZSTD
                          ? "zstd" : "zlib") == 0;
    if (strcmp(key, "encrypt") == 0)
        return lua_isboolean(L, -1) &&
               lua_toboolean(L, -1) == (h->crypt_method != QCOW2_CRYPT_NONE);
    return 0;   /* data_file, data_file_raw */
}

/* version (2 or 3) and compat ("0.10", "1.1", "v2", "v3"): another value
 * is an unknown enumeration value and raises; the two disagreeing is a
 * refused combination, as in create. Returns 1, or 0 with fail pushed. */
static int read_version(lua_State *L, ql_image *q, uint32_t *version)
{
    static const char *const compat_names[] = {
        "0.10", "v2", "1.1", "v3", NULL
    };
    lua_Integer v = 0;
    int compat = ql_opt_choice(L, 2, FN, "compat", compat_names);
    uint32_t from_compat = compat < 0 ? 0 : compat < 2 ? 2 : 3;

    if (ql_opt_integer(L, 2, FN, "version", 0, &v) && v != 2 && v != 3)
        luaL_error(L, "bad option 'version' to '" FN "' (2 or 3 expected, "
                   "got %I)", v);
    if (v && from_compat && (uint32_t)v != from_compat) {
        ql_push_fail(L, QCOW2_E_INVALID, "%s: version %d and compat "
                     "disagree", qcow2_path(q->img), (int)v);
        return 0;
    }
    *version = v ? (uint32_t)v : from_compat;
    return 1;
}

/* img:amend{version=, compat=, lazy_refcounts=, backing_file=,
 * backing_format=, size=} -> true | nil, message, code. Types, unknown
 * keys and enumeration values are checked first (misuse raises); then a
 * read-only handle answers "readonly", and what the image cannot take
 * "unsupported" or "invalid". */
static int image_amend(lua_State *L)
{
    static const char *const keys[] = {
        "version", "compat", "lazy_refcounts", "backing_file",
        "backing_format", "size", "preallocation", "cluster_size",
        "refcount_bits", "extended_l2", "compression_type", "encrypt",
        "data_file", "data_file_raw", NULL
    };
    /* Creation-only options and the type each must have. */
    static const struct { const char *key; int type; } creation[] = {
        {"cluster_size", LUA_TNUMBER}, {"refcount_bits", LUA_TNUMBER},
        {"extended_l2", LUA_TBOOLEAN}, {"compression_type", LUA_TSTRING},
        {"data_file", LUA_TSTRING}, {"data_file_raw", LUA_TBOOLEAN},
    };
    static const char *const prealloc_modes[] = {
        "off", "metadata", "falloc", "full", NULL
    };
    static const char *const compression_types[] = { "zlib", "zstd", NULL };
    ql_image *q = ql_check_image(L, 1);
    qcow2_amend_opts opts;
    lua_Integer size = -1, unused;
    int prealloc, encrypt_type, rc;

    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    ql_check_options(L, 2, FN, keys);
    qcow2_amend_opts_init(&opts);

    /* Everything that raises, before the image is asked anything. */
    ql_opt_integer(L, 2, FN, "size", 1, &size);
    opts.lazy_refcounts = ql_opt_bool(L, 2, FN, "lazy_refcounts");
    if (ql_opt_field(L, 2, FN, "backing_file", LUA_TSTRING) != LUA_TNIL)
        opts.backing_file = lua_tostring(L, -1);
    if (ql_opt_field(L, 2, FN, "backing_format", LUA_TSTRING) != LUA_TNIL)
        opts.backing_format = lua_tostring(L, -1);
    lua_pop(L, 2);  /* the strings stay referenced by the options table */
    prealloc = ql_opt_choice(L, 2, FN, "preallocation", prealloc_modes);
    ql_opt_integer(L, 2, FN, "cluster_size", 1, &unused);
    ql_opt_integer(L, 2, FN, "refcount_bits", 1, &unused);
    ql_opt_bool(L, 2, FN, "extended_l2");
    ql_opt_choice(L, 2, FN, "compression_type", compression_types);
    ql_opt_bool(L, 2, FN, "data_file_raw");
    ql_opt_field(L, 2, FN, "data_file", LUA_TSTRING);
    lua_pop(L, 1);
    encrypt_type = lua_getfield(L, 2, "encrypt");
    lua_pop(L, 1);
    if (encrypt_type != LUA_TNIL && encrypt_type != LUA_TBOOLEAN &&
        encrypt_type != LUA_TTABLE)
        return luaL_error(L, "bad option 'encrypt' to '" FN "' (boolean or "
                          "table expected, got %s)",
                          lua_typename(L, encrypt_type));
    if (!read_version(L, q, &opts.version))
        return 3;

    if (qcow2_is_read_only(q->img))
        return refuse_readonly(L, q, FN);
    if (size == 0)
        return ql_push_fail(L, QCOW2_E_INVALID, "%s: size must be a "
                            "positive integer", qcow2_path(q->img));
    if (size > 0)
        opts.size = (uint64_t)size;
    if (prealloc >= 0)
        return ql_push_fail(L, QCOW2_E_UNSUPPORTED, "%s: Cannot change "
                            "preallocation mode", qcow2_path(q->img));
    for (size_t i = 0; i < sizeof creation / sizeof creation[0]; i++) {
        const char *key = creation[i].key;
        int same = lua_getfield(L, 2, key) == LUA_TNIL ||
                   creation_only_same(L, q, key);
        lua_pop(L, 1);
        if (!same)
            return ql_push_fail(L, QCOW2_E_UNSUPPORTED, "%s: Cannot change "
                                "%s with amend (only supported for image "
                                "creation)", qcow2_path(q->img), key);
    }
    if (encrypt_type != LUA_TNIL) {
        int same;
        lua_getfield(L, 2, "encrypt");
        same = creation_only_same(L, q, "encrypt");
        lua_pop(L, 1);
        if (!same && encrypt_type == LUA_TTABLE)
            return ql_push_fail(L, QCOW2_E_UNSUPPORTED, "%s: re-encryption "
                                "and key changes with amend are not "
                                "supported", qcow2_path(q->img));
        if (!same)
            return ql_push_fail(L, QCOW2_E_UNSUPPORTED, "%s: Cannot change "
                                "encrypt with amend (only supported for "
                                "image creation)", qcow2_path(q->img));
    }
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

const luaL_Reg ql_image_amend_methods[] = {
    {"amend", image_amend},
    {"make_empty", image_make_empty},
    {NULL, NULL}
};
