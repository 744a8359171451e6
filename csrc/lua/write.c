/*
 * lua-qcow2 binding: the Image methods that write ("qcow2.Image", continued
 * from image.c), plus raw_read and io_log, their test-side companions.
 *
 * Every writing method answers the same way: true on success (like
 * file:flush), nil, message, code on failure (the engine's code: "io",
 * "nospace", "invalid", "corrupt", ...), and "readonly" on a handle that
 * may not write: mode "r", a backing image, a snapshot view. Argument
 * types are checked here (misuse raises); ranges against the disk are
 * checked here too so the message names the call; everything about the
 * format is the engine's.
 */
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

ql_image *ql_writable_image(lua_State *L, int idx, const char *what)
{
    ql_image *q = ql_check_image(L, idx);

    /* Backing images and snapshot views are read-only whatever the
     * engine says: they borrow files another handle owns. */
    if (q->kind != QL_OWNED || qcow2_is_read_only(q->img)) {
        ql_push_fail(L, QCOW2_E_READONLY, "%s: %s: the image is open "
                     "read-only", qcow2_path(q->img), what);
        return NULL;
    }
    return q;
}

/* [offset, offset+length) must lie inside the disk: a guest write past
 * the end is refused, not clamped (see ql_check_inside). */
static int guest_range(lua_State *L, ql_image *q, const char *what,
                       uint64_t offset, uint64_t length)
{
    return ql_check_inside(L, qcow2_path(q->img), what, offset, length,
                           qcow2_virtual_size(q->img));
}

/* true, or nil, message, code of a failed engine call. */
static int push_status(lua_State *L, ql_image *q, int rc)
{
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* img:write(offset, data) -> true | nil, message, code */
static int image_write(lua_State *L)
{
    uint64_t offset = ql_check_offset(L, 2);
    size_t length;
    const char *data = luaL_checklstring(L, 3, &length);
    ql_image *q = ql_writable_image(L, 1, "write");

    if (q == NULL)
        return 3;
    if (!guest_range(L, q, "write", offset, length))
        return 3;
    if (length == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return push_status(L, q, qcow2_write(q->img, offset, data, length));
}

/* img:write_zeroes(offset, length [, {unmap = bool}]) */
static int image_write_zeroes(lua_State *L)
{
    static const char *const keys[] = { "unmap", NULL };
    uint64_t offset = ql_check_offset(L, 2);
    uint64_t length = ql_check_length(L, 3);
    int unmap = 0;
    ql_image *q;

    if (ql_opt_options(L, 4, "write_zeroes", keys))
        unmap = ql_opt_bool(L, 4, "write_zeroes", "unmap") > 0;
    q = ql_writable_image(L, 1, "write_zeroes");
    if (q == NULL)
        return 3;
    if (!guest_range(L, q, "write_zeroes", offset, length))
        return 3;
    if (length == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return push_status(L, q, qcow2_write_zeroes(q->img, offset, length,
                                                unmap));
}

/* img:discard(offset, length) */
static int image_discard(lua_State *L)
{
    uint64_t offset = ql_check_offset(L, 2);
    uint64_t length = ql_check_length(L, 3);
    ql_image *q = ql_writable_image(L, 1, "discard");

    if (q == NULL)
        return 3;
    if (!guest_range(L, q, "discard", offset, length))
        return 3;
    if (length == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return push_status(L, q, qcow2_discard(q->img, offset, length));
}

/* img:write_compressed(offset, data): one whole cluster (the engine
 * refuses anything else with "invalid"). */
static int image_write_compressed(lua_State *L)
{
    uint64_t offset = ql_check_offset(L, 2);
    size_t length;
    const char *data = luaL_checklstring(L, 3, &length);
    ql_image *q = ql_writable_image(L, 1, "write_compressed");

    if (q == NULL)
        return 3;
    if (!guest_range(L, q, "write_compressed", offset, length))
        return 3;
    return push_status(L, q, qcow2_write_compressed(q->img, offset, data,
                                                    length));
}

/* img:flush(): caches to disk, then fsync. A read-only handle has nothing
 * to flush and answers true. */
static int image_flush(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);

    if (q->kind != QL_OWNED || qcow2_is_read_only(q->img)) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return push_status(L, q, qcow2_flush(q->img));
}

/* img:resize(size); img.size follows (it is read from the engine). */
static int image_resize(lua_State *L)
{
    uint64_t size = ql_check_size(L, 2);
    ql_image *q = ql_writable_image(L, 1, "resize");

    if (q == NULL)
        return 3;
    return push_status(L, q, qcow2_resize(q->img, size));
}

/*
 * img:raw_read(host_offset, length): the image file's own bytes, through
 * the handle's I/O (never writes; allowed on read-only handles and
 * snapshot views for forensic use). An offset past the end of the file is
 * "invalid"; a length running past it is cut short, as io's reads are.
 */
static int image_raw_read(lua_State *L)
{
    uint64_t offset = ql_check_offset(L, 2);
    uint64_t length = ql_check_length(L, 3);
    ql_image *q = ql_check_image(L, 1);
    uint64_t file_size, host_offset, bytes;
    size_t done = 0;
    char *dst;
    int rc;

    rc = qcow2_file_size(q->img, &file_size);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    if (!ql_clamp_range(L, qcow2_path(q->img), "raw read", offset, length,
                        file_size, &host_offset, &bytes))
        return 3;
    if (bytes == 0) {
        lua_pushliteral(L, "");
        return 1;
    }
    /* Allocation failure is nil, message, "nomem" (result.c). */
    dst = ql_result_alloc(L, qcow2_path(q->img), (size_t)bytes, &rc);
    if (dst == NULL)
        return rc;
    rc = qcow2_raw_read(q->img, host_offset, dst, (size_t)bytes, &done);
    if (rc < 0) {
        free(dst);
        return ql_push_engine_error(L, q->img, rc);
    }
    if (done > bytes)
        done = (size_t)bytes;
    return ql_result_push(L, qcow2_path(q->img), dst, done);
}

/* img:raw_write(host_offset, data): bytes into the image file itself,
 * bypassing the format and its checks (read-write handles only). */
static int image_raw_write(lua_State *L)
{
    uint64_t offset = ql_check_offset(L, 2);
    size_t length;
    const char *data = luaL_checklstring(L, 3, &length);
    ql_image *q = ql_writable_image(L, 1, "raw_write");

    if (q == NULL)
        return 3;
    if (length == 0) {
        lua_pushboolean(L, 1);
        return 1;
    }
    return push_status(L, q, qcow2_raw_write(q->img, offset, data, length));
}

/* img:io_log() -> {{offset=, length=, what=}, ...}: the writes, truncates
 * (what = "truncate", offset = the new size, length = 0) and flushes
 * (what = "flush", offset = length = 0) recorded with io = {trace = true},
 * in order (an empty array without tracing). Every entry but a flush
 * counts as one write for stop_after_writes and fail_after_writes. */
static int image_io_log(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    size_t count = qcow2_io_log_count(q->img);

    lua_createtable(L, count > INT32_MAX ? 0 : (int)count, 0);
    for (size_t i = 0; i < count; i++) {
        qcow2_io_record record;
        int rc = qcow2_io_log_at(q->img, i, &record);
        if (rc < 0)
            return ql_push_engine_error(L, q->img, rc);
        lua_createtable(L, 0, 3);
        ql_set_int(L, "offset", record.offset);
        ql_set_int(L, "length", record.length);
        ql_set_str(L, "what", record.what ? record.what : "unknown");
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

static void set_cache_stats(lua_State *L, const char *key,
                            const qcow2_cache_stats *c)
{
    lua_createtable(L, 0, 7);
    ql_set_int(L, "hits", c->hits);
    ql_set_int(L, "misses", c->misses);
    ql_set_int(L, "evictions", c->evictions);
    ql_set_int(L, "writebacks", c->writebacks);
    ql_set_int(L, "dirty", c->dirty);
    ql_set_int(L, "cached", c->cached);
    ql_set_int(L, "slots", c->slots);
    lua_setfield(L, -2, key);
}

/* img:stats() -> {l2 = {hits=, misses=, evictions=, writebacks=, dirty=,
 * cached=, slots=}, refcount = {...}, flushes=, syncs=, reads=,
 * bytes_read=, writes=, bytes_written=}: counters since open. */
static int image_stats(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    qcow2_stats st;
    int rc = qcow2_stats_get(q->img, &st);

    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_createtable(L, 0, 8);
    set_cache_stats(L, "l2", &st.l2);
    set_cache_stats(L, "refcount", &st.refcount);
    ql_set_int(L, "flushes", st.flushes);
    ql_set_int(L, "syncs", st.syncs);
    ql_set_int(L, "reads", st.reads);
    ql_set_int(L, "bytes_read", st.bytes_read);
    ql_set_int(L, "writes", st.writes);
    ql_set_int(L, "bytes_written", st.bytes_written);
    return 1;
}

const luaL_Reg ql_image_write_methods[] = {
    {"write", image_write},
    {"write_zeroes", image_write_zeroes},
    {"discard", image_discard},
    {"write_compressed", image_write_compressed},
    {"flush", image_flush},
    {"resize", image_resize},
    {"raw_read", image_raw_read},
    {"raw_write", image_raw_write},
    {"io_log", image_io_log},
    {"stats", image_stats},
    {NULL, NULL}
};
