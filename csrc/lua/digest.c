/*
 * lua-qcow2 binding: img:digest (guest bytes hashed through OpenSSL's EVP,
 * read by the engine's bulk reader, whose workers inflate compressed
 * clusters; damaged ranges counted as zeroes on request; a progress hook).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

#include "common.h"

/* img:digest's bulk read stream, closed by __gc if a Lua error unwinds
 * past the digest loop (a stream owns worker threads). */
#define QL_BULK_BOX "qcow2.BulkRead"

/* ---- digest() ------------------------------------------------------------------ */

/* The ranges a digest with on_error = "zero" could not read, in order;
 * pieces of one damaged unit cut by the chunked reads are joined. Filled
 * by the engine's callback, which never calls Lua. */
typedef struct damage_range {
    uint64_t start, length, unit_start;
    char *reason;
} damage_range;

typedef struct damage_list {
    damage_range *ranges;
    size_t count, capacity;
} damage_list;

static int collect_damage(void *ctx, uint64_t start, uint64_t length,
                          uint64_t unit_start, const char *reason)
{
    damage_list *d = ctx;
    damage_range *last = d->count ? &d->ranges[d->count - 1] : NULL;

    if (last && last->start + last->length == start &&
        last->unit_start == unit_start) {
        last->length += length;
        return 0;
    }
    if (d->count == d->capacity) {
        size_t capacity = d->capacity ? d->capacity * 2 : 16;
        damage_range *grown = capacity > SIZE_MAX / sizeof *grown ? NULL
                              : realloc(d->ranges, capacity * sizeof *grown);
        if (grown == NULL)
            return 1;   /* stops the read; reported as "nomem" */
        d->ranges = grown;
        d->capacity = capacity;
    }
    d->ranges[d->count].reason = strdup(reason);
    if (d->ranges[d->count].reason == NULL)
        return 1;
    d->ranges[d->count].start = start;
    d->ranges[d->count].length = length;
    d->ranges[d->count].unit_start = unit_start;
    d->count++;
    return 0;
}

static void damage_free(damage_list *d)
{
    for (size_t i = 0; i < d->count; i++)
        free(d->ranges[i].reason);
    free(d->ranges);
    memset(d, 0, sizeof *d);
}

/* {{start=, length=, reason=}, ...}. The caller frees the list after
 * (only a Lua memory error while building the table could leak it). */
static void push_damage(lua_State *L, damage_list *d)
{
    lua_createtable(L, (int)(d->count < INT32_MAX ? d->count : 0), 0);
    for (size_t i = 0; i < d->count; i++) {
        lua_createtable(L, 0, 3);
        ql_set_int(L, "start", d->ranges[i].start);
        ql_set_int(L, "length", d->ranges[i].length);
        ql_set_str(L, "reason", d->ranges[i].reason);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
}

static int bulk_box_gc(lua_State *L)
{
    qcow2_bulk **box = lua_touserdata(L, 1);
    qcow2_bulk_close(*box);
    *box = NULL;
    return 0;
}

static qcow2_bulk **bulk_box_new(lua_State *L)
{
    qcow2_bulk **box = lua_newuserdatauv(L, sizeof *box, 0);

    *box = NULL;
    if (luaL_newmetatable(L, QL_BULK_BOX)) {
        lua_pushcfunction(L, bulk_box_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return box;
}

/* digest's arguments: [algo [, offset, length]] [, opts], the options
 * table last wherever it stands. Returns 1 for on_error = "zero"; *progress
 * is the stack index of opts.progress (a function), or 0. */
static int digest_args(lua_State *L, uint64_t size, const char **algo,
                       uint64_t *offset, uint64_t *length, int *progress)
{
    static const char *const known[] = { "on_error", "progress", NULL };
    static const char *const modes[] = { "fail", "zero", NULL };
    int top = lua_gettop(L), opts, zero = 0;

    *progress = 0;
    if (top >= 2 && lua_type(L, top) == LUA_TTABLE) {
        opts = top;
        ql_check_options(L, opts, "digest", known);
        zero = ql_opt_choice(L, opts, "digest", "on_error", modes) == 1;
        lua_getfield(L, opts, "progress");
        if (!lua_isnil(L, -1) && !lua_isfunction(L, -1))
            luaL_error(L, "digest option 'progress' must be a function, "
                       "not a %s", luaL_typename(L, -1));
        lua_replace(L, opts);       /* opts.progress (or nil) takes its slot */
        /* The hook moves past the positional slots (2..4), which read as
         * absent where the caller gave none. */
        if (top < 5) {
            lua_settop(L, 5);
            lua_copy(L, top, 5);
            lua_pushnil(L);
            lua_replace(L, top);
        }
        if (lua_isfunction(L, top < 5 ? 5 : top))
            *progress = top < 5 ? 5 : top;
    }
    *algo = luaL_optstring(L, 2, "sha256");
    ql_opt_range(L, 3, size, offset, length);
    return zero;
}

/* Seconds on a clock that never goes back, for pacing the progress hook. */
static double digest_now(void)
{
    struct timespec ts;

    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        return 0.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Between chunks at most this often (seconds): at least once a second, as
 * promised, without calling Lua for every 4 MiB of a fast disk. */
#define QL_DIGEST_PROGRESS_EVERY 0.25

/* Call progress(done, total) protected: nothing may raise while the
 * OpenSSL context and the damage list are live. 0, or the pcall status
 * with the error object left on the stack. */
static int digest_progress(lua_State *L, int fn, uint64_t done, uint64_t total)
{
    lua_pushvalue(L, fn);
    lua_pushinteger(L, (lua_Integer)done);
    lua_pushinteger(L, (lua_Integer)total);
    return lua_pcall(L, 2, 0, 0);
}

/* img:digest([algo [, offset, length]] [, {on_error = "fail" | "zero"}])
 *   -> hex | nil, message, code; with on_error = "zero": hex, damage.
 * An algorithm OpenSSL does not know is "invalid", not misuse: the set
 * depends on the OpenSSL build, as a file's existence does on the disk.
 * With "zero", ranges whose metadata cannot be followed hash as zeroes
 * and come back as {start=, length=, reason=}; other failures (I/O,
 * encryption) still fail.
 * opts.progress(done, total), when given, is called with the bytes hashed
 * so far: first with 0, then between chunks at least once a second, last
 * with done == total. An error it raises stops the digest; the context
 * and the list are freed, then the error propagates (the handle is
 * whole: the engine is never inside a call when the hook runs). */
static int image_digest(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    uint64_t size = qcow2_virtual_size(q->img);
    uint64_t offset, length, guest_offset, bytes;
    const char *algo;
    const EVP_MD *md;
    EVP_MD_CTX *ctx;
    unsigned char digest[EVP_MAX_MD_SIZE];
    unsigned int digest_len = 0;
    char hex[2 * EVP_MAX_MD_SIZE + 1];
    damage_list damage = { NULL, 0, 0 };
    qcow2_bulk **box;
    int rc = 0, evp_ok, zero, progress, perr = LUA_OK;
    uint64_t total, done = 0;
    double last = 0.0;

    zero = digest_args(L, size, &algo, &offset, &length, &progress);
    if (!ql_clamp_range(L, qcow2_path(q->img), "digest", offset, length,
                        size, &guest_offset, &bytes))
        return 3;
    md = EVP_get_digestbyname(algo);
    if (md == NULL)
        return ql_push_fail(L, QCOW2_E_INVALID,
                            "%s: unknown digest algorithm '%s'",
                            qcow2_path(q->img), algo);
    /* The stream lives in a box whose __gc closes it (joins its worker
     * threads) should anything below ever raise; allocated by Lua before
     * the OpenSSL context exists, so nothing below raises while ctx (or
     * the damage list) is live. The progress hook runs protected, between
     * chunks: the workers never touch Lua. */
    box = bulk_box_new(L);
    rc = qcow2_bulk_open(q->img, guest_offset, bytes, 0,
                         zero ? collect_damage : NULL, &damage, box);
    total = bytes;
    ctx = EVP_MD_CTX_new();
    evp_ok = rc == 0 && ctx != NULL && EVP_DigestInit_ex(ctx, md, NULL);
    if (evp_ok && progress) {
        perr = digest_progress(L, progress, 0, total);
        last = digest_now();
    }
    while (evp_ok && perr == LUA_OK) {
        const void *data;
        size_t n;
        rc = qcow2_bulk_next(*box, &data, &n);
        if (rc != 0 || n == 0)
            break;
        evp_ok = EVP_DigestUpdate(ctx, data, n);
        done += n;
        if (progress && evp_ok &&
            (done == total || digest_now() - last >= QL_DIGEST_PROGRESS_EVERY)) {
            perr = digest_progress(L, progress, done, total);
            last = digest_now();
        }
    }
    qcow2_bulk_close(*box);
    *box = NULL;
    if (rc == 0 && evp_ok && perr == LUA_OK)
        evp_ok = EVP_DigestFinal_ex(ctx, digest, &digest_len);
    EVP_MD_CTX_free(ctx);
    if (perr != LUA_OK) {
        damage_free(&damage);
        return lua_error(L);        /* the hook's error, as it raised it */
    }
    if (rc < 0) {
        damage_free(&damage);
        return ql_push_engine_error(L, q->img, rc);
    }
    if (rc > 0 || !evp_ok) {
        damage_free(&damage);
        return ql_push_fail(L, QCOW2_E_NOMEM, "%s: %s digest failed",
                            qcow2_path(q->img), algo);
    }
    for (unsigned int i = 0; i < digest_len; i++)
        snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    lua_pushlstring(L, hex, 2 * (size_t)digest_len);
    if (!zero)
        return 1;
    push_damage(L, &damage);
    damage_free(&damage);
    return 2;
}


/* The Image methods this file implements. */
const luaL_Reg ql_image_digest_methods[] = {
    {"digest", image_digest},
    {NULL, NULL}
};
