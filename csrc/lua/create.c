/*
 * lua-qcow2 binding: qcow2.create(path, opts), the create options into
 * qcow2_create_opts. Misuse raises (a wrong type, an unknown key, an
 * unknown enumeration value, a negative size); values are otherwise the
 * engine's to judge, so a size or combination qemu-img refuses comes
 * back as nil, qemu-img's reason, "invalid".
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
    "data_file_raw", "overwrite", "cache", "io", NULL
};

/* The keys of `encrypt` (qemu-img's encrypt.* options). */
static const char *const encrypt_keys[] = {
    "format", "key", "cipher_alg", "cipher_mode", "ivgen_alg",
    "ivgen_hash_alg", "hash_alg", "iter_time", NULL
};

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

/* version (2 or 3) and compat ("0.10", "1.1", "v2", "v3"): any other
 * value is an unknown enumeration value and raises; the two disagreeing
 * is a refused combination. Returns 1, or 0 with fail pushed. */
static int read_version(lua_State *L, int opts, const char *path,
                        qcow2_create_opts *o)
{
    static const char *const compat_names[] = {
        "0.10", "v2", "1.1", "v3", NULL
    };
    char msg[128];
    lua_Integer version = 0;
    int compat = ql_opt_choice(L, opts, FN, "compat", compat_names);
    uint32_t from_compat = compat < 0 ? 0 : compat < 2 ? 2 : 3;

    if (ql_opt_integer(L, opts, FN, "version", 0, &version) &&
        version != 2 && version != 3)
        luaL_error(L, "bad option 'version' to '" FN "' (2 or 3 expected, "
                   "got %I)", version);
    if (version && from_compat && from_compat != (uint32_t)version) {
        snprintf(msg, sizeof msg, "version %d and compat disagree",
                 (int)version);
        push_create_error(L, path, QCOW2_E_INVALID, msg);
        return 0;
    }
    if (version)
        o->version = (uint32_t)version;
    else if (from_compat)
        o->version = from_compat;
    return 1;
}

/* A non-negative integer option (cluster_size, refcount_bits): a value
 * qemu-img refuses (0, 1000, 3) reaches the engine, which answers with
 * qemu-img's reason; a negative one raises. */
static uint64_t opt_unsigned(lua_State *L, int opts, const char *name,
                             uint64_t dflt)
{
    lua_Integer v;
    if (!ql_opt_integer(L, opts, FN, name, 1, &v))
        return dflt;
    return (uint64_t)v;
}

/* opts.encrypt: a table of known keys, its format "aes" or "luks" (a
 * format must be named: legacy AES is weak and never a default). The
 * strings stay referenced by opts, on the stack for the whole call. */
static void read_encrypt(lua_State *L, int opts, qcow2_encrypt_opts *e)
{
    static const char *const formats[] = { "aes", "luks", NULL };
    static const char *const names[] = {
        "cipher_alg", "cipher_mode", "ivgen_alg", "ivgen_hash_alg",
        "hash_alg"
    };
    const char **fields[] = {
        &e->cipher_alg, &e->cipher_mode, &e->ivgen_alg, &e->ivgen_hash_alg,
        &e->hash_alg
    };
    lua_Integer ms;
    int t, format;

    if (ql_opt_field(L, opts, FN, "encrypt", LUA_TTABLE) == LUA_TNIL) {
        lua_pop(L, 1);
        return;
    }
    t = lua_gettop(L);
    ql_check_options(L, t, FN, encrypt_keys);
    format = ql_opt_choice(L, t, FN, "format", formats);
    if (format < 0)
        luaL_error(L, "bad option 'encrypt' to '" FN "' (format \"aes\" or "
                   "\"luks\" expected)");
    e->format = formats[format];
    if (ql_opt_field(L, t, FN, "key", LUA_TSTRING) != LUA_TNIL)
        e->key = lua_tolstring(L, -1, &e->key_len);
    lua_pop(L, 1);
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        *fields[i] = opt_string(L, t, names[i]);
    if (ql_opt_integer(L, t, FN, "iter_time", 1, &ms))
        e->iter_time_ms = ms > 0 ? (uint64_t)ms : 1;
    lua_pop(L, 1);
}

/* qcow2.create(path, opts) -> Image (open read-write) | nil, message, code */
int ql_module_create(lua_State *L)
{
    const char *path = luaL_checkstring(L, 1);
    qcow2_create_opts o;
    qcow2_open_opts open_opts;
    qcow2_error err;
    static const char *const prealloc_modes[] = {
        "off", "metadata", "falloc", "full", NULL
    };
    static const char *const compression_types[] = { "zlib", "zstd", NULL };
    qcow2_image *h = NULL;
    lua_Integer size;
    ql_image *q;
    int prealloc, compression, rc;

    luaL_checktype(L, 2, LUA_TTABLE);
    lua_settop(L, 2);
    ql_check_options(L, 2, FN, create_keys);
    qcow2_create_opts_init(&o);
    qcow2_open_opts_init(&open_opts);

    if (!ql_opt_integer(L, 2, FN, "size", 1, &size))
        return luaL_error(L, "bad option 'size' to '" FN "' (number "
                          "expected, got nil)");
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
    prealloc = ql_opt_choice(L, 2, FN, "preallocation", prealloc_modes);
    o.preallocation = prealloc < 0 ? NULL : prealloc_modes[prealloc];
    o.backing_file = opt_string(L, 2, "backing_file");
    o.backing_format = opt_string(L, 2, "backing_format");
    compression = ql_opt_choice(L, 2, FN, "compression_type",
                                compression_types);
    o.compression_type = compression < 0 ? NULL
                                         : compression_types[compression];
    o.data_file = opt_string(L, 2, "data_file");
    /* cache: the returned handle's mode, as open's. */
    {
        int mode = ql_opt_choice(L, 2, FN, "cache", ql_cache_modes);
        open_opts.cache_mode = mode < 0 ? 0 : mode;
    }
    /* The handle create returns may carry a fault plan (tests). */
    ql_opt_io(L, 2, FN, &open_opts);

    read_encrypt(L, 2, &o.encrypt);

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
