/*
 * lua-qcow2 binding: qcow2.create(path, opts), the create options into
 * qcow2_create_opts. Types are checked here (a wrong type raises, as
 * luaL_check* does); values are the engine's to judge, so a refused
 * combination comes back as nil, qemu-img's reason, "invalid".
 */
#include <stdio.h>
#include <string.h>

#include "common.h"

#define FN "create"

/* nil, message, code, the message naming the file as qemu-img's do
 * ("disk.qcow2: Cluster size must be ..."): the engine's refusals give
 * qemu-img's reason alone. */
static int push_create_error(lua_State *L, const char *path, int code,
                             const char *msg)
{
    size_t path_len = strlen(path);

    luaL_pushfail(L);
    if (strncmp(msg, path, path_len) == 0 && msg[path_len] == ':')
        lua_pushstring(L, msg);
    else
        lua_pushfstring(L, "%s: %s", path, msg);
    lua_pushstring(L, qcow2_status_name(code));
    return 3;
}

/* Every key create understands: a misspelt option raises instead of
 * silently giving an image with the defaults (qemu-img refuses unknown
 * -o options too). */
static const char *const create_keys[] = {
    "size", "version", "compat", "cluster_size", "refcount_bits",
    "lazy_refcounts", "preallocation", "backing_file", "backing_format",
    "encrypt", "extended_l2", "compression_type", "data_file",
    "data_file_raw", "overwrite", "io", NULL
};

static void check_keys(lua_State *L, int opts)
{
    lua_pushnil(L);
    while (lua_next(L, opts)) {
        int known = 0;
        lua_pop(L, 1);
        for (int i = 0; create_keys[i] && lua_type(L, -1) == LUA_TSTRING; i++)
            known |= strcmp(create_keys[i], lua_tostring(L, -1)) == 0;
        if (!known) {
            lua_pushvalue(L, -1);   /* tostring may not touch the key */
            luaL_error(L, "bad option '%s' to '" FN "' (unknown option)",
                       luaL_tolstring(L, -1, NULL));
        }
    }
}

/* A string option, or NULL; the string stays referenced by opts, which
 * is on the stack for the whole call. */
static const char *opt_string(lua_State *L, int opts, const char *name)
{
    const char *s = NULL;
    if (ql_opt_field(L, opts, FN, name, LUA_TSTRING) != LUA_TNIL)
        s = lua_tostring(L, -1);
    lua_pop(L, 1);
    return s;
}

/* version (2 or 3) and compat ("0.10" or "1.1", qemu-img's name for it).
 * Returns 1, or 0 with fail pushed. */
static int read_version(lua_State *L, int opts, const char *path,
                        qcow2_create_opts *o)
{
    char msg[128];

    lua_Integer version;
    const char *compat = opt_string(L, opts, "compat");
    int has_version = ql_opt_integer(L, opts, FN, "version", 0, &version);
    uint32_t from_compat = 0;

    if (compat) {
        if (strcmp(compat, "0.10") == 0 || strcmp(compat, "v2") == 0)
            from_compat = 2;
        else if (strcmp(compat, "1.1") == 0 || strcmp(compat, "v3") == 0)
            from_compat = 3;
        else {
            snprintf(msg, sizeof msg, "Parameter 'version' does not accept "
                     "value '%.40s'", compat);
            push_create_error(L, path, QCOW2_E_INVALID, msg);
            return 0;
        }
    }
    if (has_version) {
        if (version < 0 || version > UINT32_MAX) {
            snprintf(msg, sizeof msg, "Parameter 'version' does not accept "
                     "value '%lld'", (long long)version);
            push_create_error(L, path, QCOW2_E_INVALID, msg);
            return 0;
        }
        if (from_compat && from_compat != (uint32_t)version) {
            snprintf(msg, sizeof msg, "version %lld and compat '%.40s' "
                     "disagree", (long long)version, compat);
            push_create_error(L, path, QCOW2_E_INVALID, msg);
            return 0;
        }
        o->version = (uint32_t)version;
    } else if (from_compat) {
        o->version = from_compat;
    }
    return 1;
}

/* A size-like integer option (cluster_size, refcount_bits): a negative
 * value is an invalid value, not misuse; it reaches the engine as a value
 * no power-of-two check accepts. */
static uint64_t opt_unsigned(lua_State *L, int opts, const char *name,
                             uint64_t dflt)
{
    lua_Integer v;
    if (!ql_opt_integer(L, opts, FN, name, 0, &v))
        return dflt;
    return v < 0 ? UINT64_MAX : (uint64_t)v;
}

/* qcow2.create(path, opts) -> Image (open read-write) | nil, message, code */
int ql_module_create(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    qcow2_create_opts o;
    qcow2_open_opts open_opts;
    qcow2_error err;
    qcow2_image *h = NULL;
    lua_Integer size;
    ql_image *q;
    int rc;

    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    check_keys(L, 2);
    qcow2_create_opts_init(&o);
    qcow2_open_opts_init(&open_opts);

    if (!ql_opt_integer(L, 2, FN, "size", 0, &size))
        return luaL_error(L, "bad option 'size' to '" FN "' (number "
                          "expected, got nil)");
    if (size < 0)
        return push_create_error(L, path, QCOW2_E_INVALID, "Invalid image "
                                 "size specified. Must be between 0 and "
                                 "9223372036854775807.");
    o.size = (uint64_t)size;
    if (!read_version(L, 2, path, &o))
        return 3;
    o.cluster_size = opt_unsigned(L, 2, "cluster_size", o.cluster_size);
    {
        uint64_t bits = opt_unsigned(L, 2, "refcount_bits", o.refcount_bits);
        /* Any width the engine can hold as a value; it rejects all but
         * 1..64 powers of two with qemu-img's reason. */
        o.refcount_bits = bits > UINT32_MAX ? 3 : (uint32_t)bits;
    }
    o.lazy_refcounts = ql_opt_bool(L, 2, FN, "lazy_refcounts") > 0;
    o.extended_l2 = ql_opt_bool(L, 2, FN, "extended_l2") > 0;
    o.data_file_raw = ql_opt_bool(L, 2, FN, "data_file_raw") > 0;
    o.overwrite = ql_opt_bool(L, 2, FN, "overwrite") > 0;
    o.preallocation = opt_string(L, 2, "preallocation");
    o.backing_file = opt_string(L, 2, "backing_file");
    o.backing_format = opt_string(L, 2, "backing_format");
    o.compression_type = opt_string(L, 2, "compression_type");
    o.data_file = opt_string(L, 2, "data_file");
    /* The handle create returns may carry a fault plan (tests). */
    ql_opt_io(L, 2, FN, &open_opts);

    if (ql_opt_field(L, 2, FN, "encrypt", LUA_TTABLE) != LUA_TNIL) {
        /* TODO(encryption): the engine writes no encrypted images yet.
         * Refused before any file is made. */
        return push_create_error(L, path, QCOW2_E_UNSUPPORTED, "creating "
                                 "encrypted images is not supported yet");
    }
    lua_pop(L, 1);

    /* The userdata first: a memory error after qcow2_create would leak h. */
    q = ql_image_alloc(L, QL_OWNED, 0);
    memset(&err, 0, sizeof err);
    rc = qcow2_create(path, &o, &open_opts, &h, &err);
    if (rc < 0 || h == NULL) {
        if (err.code == 0)
            err.code = rc < 0 ? rc : QCOW2_E_IO;
        return push_create_error(L, path, err.code,
                                 err.msg[0] ? err.msg
                                            : qcow2_status_name(err.code));
    }
    ql_image_attach(q, h);
    return 1;
}
