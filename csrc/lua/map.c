/*
 * lua-qcow2 binding: the ClusterMap userdata ("qcow2.ClusterMap").
 *
 * The engine's extents (already merged as qemu-img merges them) are copied
 * into a compact store (map_store.c: a few bytes per extent) while
 * qcow2_map runs: the callback allocates with realloc and never calls
 * Lua, so no Lua error can unwind through the engine. m[i] builds the extent's table on demand. A map holds no
 * reference to the Image it came from: it never reads it again, so the
 * Image (and its file descriptor) may be closed or collected first.
 * m:to_json() turns the store into qemu-img map's JSON in C (map_json.c),
 * with no Lua table per extent: a string, or pieces to a file or a
 * function.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

struct ql_map {
    ql_extent_store store;      /* malloc'd; freed by __gc */
    int out_of_memory;          /* the collector could not grow the array */
    char *json;                 /* to_json's text while Lua copies it;
                                   freed after, or by __gc if that raised */
};

static const char *const extent_type_names[] = {
    "data", "zero", "unallocated", "compressed", "corrupt"
};

static const char *extent_type_name(int type)
{
    if (type >= 0 && type <= QCOW2_EXTENT_CORRUPT)
        return extent_type_names[type];
    return "unknown";
}

ql_map *ql_map_new(lua_State *L)
{
    ql_map *m = lua_newuserdatauv(L, sizeof *m, 0);

    memset(m, 0, sizeof *m);
    luaL_setmetatable(L, QL_MAP);
    return m;
}

static int collect_extent(void *ctx, const qcow2_extent *extent)
{
    ql_map *m = ctx;

    /* the engine's reason lives only during the call: the store keeps a
     * copy (freed by __gc) */
    if (ql_store_add(&m->store, extent) < 0) {
        m->out_of_memory = 1;
        return 1;   /* stop the walk; reported as "nomem" */
    }
    return 0;
}

int ql_map_fill(ql_map *m, qcow2_image *h, uint64_t offset, uint64_t length,
                char *msg, size_t msg_len)
{
    int rc;

    /* qemu-img map prints one empty record for a 0-byte disk */
    if (length == 0 && qcow2_virtual_size(h) == 0) {
        qcow2_extent empty;
        memset(&empty, 0, sizeof empty);
        empty.type = QCOW2_EXTENT_UNALLOCATED;
        rc = collect_extent(m, &empty);
    } else if (length == 0) {
        return 0;
    } else {
        rc = qcow2_map(h, offset, length, collect_extent, m);
    }
    if (m->out_of_memory) {
        snprintf(msg, msg_len, "%s: out of memory collecting the map",
                 qcow2_path(h));
        return QCOW2_E_NOMEM;
    }
    if (rc < 0) {
        snprintf(msg, msg_len, "%s", qcow2_errmsg(h));
        return rc;
    }
    return 0;
}

int ql_map_push(lua_State *L, qcow2_image *h, uint64_t offset,
                uint64_t length)
{
    char msg[QCOW2_ERRMSG_MAX];
    ql_map *m = ql_map_new(L);
    int rc = ql_map_fill(m, h, offset, length, msg, sizeof msg);

    if (rc < 0)
        return ql_push_fail(L, rc, "%s", msg);
    return 1;
}

static ql_map *check_map(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, QL_MAP);
}

/* {start=, length=, type=, offset=, depth=, compressed_size=}: offset only
 * when the engine knows a meaningful host offset, compressed_size only for
 * compressed extents, reason only for corrupt ones. */
static void push_extent(lua_State *L, const qcow2_extent *e)
{
    lua_createtable(L, 0, 6);
    ql_set_int(L, "start", e->start);
    ql_set_int(L, "length", e->length);
    ql_set_str(L, "type", extent_type_name(e->type));
    lua_pushinteger(L, e->depth);
    lua_setfield(L, -2, "depth");
    if (e->has_offset)
        ql_set_int(L, "offset", e->offset);
    if (e->type == QCOW2_EXTENT_COMPRESSED)
        ql_set_int(L, "compressed_size", e->compressed_size);
    if (e->reads_zero) {
        lua_pushboolean(L, 1);
        lua_setfield(L, -2, "reads_zero");
    }
    if (e->reason)
        ql_set_str(L, "reason", e->reason);
}

/* m[i], 1-based; nil outside 1..#m. */
static int map_fields(lua_State *L)
{
    ql_map *m = check_map(L, 1);
    qcow2_extent e;
    lua_Integer i;
    int is_int = 0;

    i = lua_tointegerx(L, 2, &is_int);
    if (is_int && i >= 1 && (uint64_t)i <= m->store.count &&
        ql_store_get(&m->store, (size_t)i - 1, &e))
        push_extent(L, &e);
    else
        lua_pushnil(L);
    return 1;
}

static int map_len(lua_State *L)
{
    ql_map *m = check_map(L, 1);
    lua_pushinteger(L, (lua_Integer)m->store.count);
    return 1;
}

static int map_iter(lua_State *L)
{
    ql_map *m = check_map(L, lua_upvalueindex(1));
    lua_Integer next = lua_tointeger(L, lua_upvalueindex(2));
    qcow2_extent e;

    if (next < 0 || (uint64_t)next >= m->store.count ||
        !ql_store_get(&m->store, (size_t)next, &e))
        return 0;
    lua_pushinteger(L, next + 1);
    lua_replace(L, lua_upvalueindex(2));
    push_extent(L, &e);
    return 1;
}

/* for e in m:extents() do ... end */
static int map_extents(lua_State *L)
{
    check_map(L, 1);
    lua_pushvalue(L, 1);
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, map_iter, 2);
    return 1;
}

/* Bytes per extent type: {data=, zero=, unallocated=, compressed=,
 * corrupt=}. */
static int map_stats(lua_State *L)
{
    ql_map *m = check_map(L, 1);
    uint64_t bytes[5] = {0, 0, 0, 0, 0};
    ql_store_cursor c;
    qcow2_extent e;

    ql_store_begin(&m->store, 0, &c);
    while (ql_store_next(&m->store, &c, &e)) {
        if (e.type >= 0 && e.type <= QCOW2_EXTENT_CORRUPT)
            bytes[e.type] += e.length;
    }
    lua_createtable(L, 0, 5);
    for (int type = 0; type <= QCOW2_EXTENT_CORRUPT; type++)
        ql_set_int(L, extent_type_names[type], bytes[type]);
    return 1;
}

/* A piece for to_json's function (the function at index 2). A Lua error
 * it raises unwinds through ql_map_json, whose text buffer is m->json:
 * freed by the next to_json or by __gc. */
static int call_sink(void *ctx, const char *text, size_t len)
{
    lua_State *L = ctx;

    lua_pushvalue(L, 2);
    lua_pushlstring(L, text, len);
    lua_call(L, 1, 0);
    return 0;
}

/* m:to_json([file | fn]) -> the JSON text of `qemu-img map --output=json`
 * (its layout, without the final newline); with an open io file: written
 * to it in pieces, true | nil, message, "io"; with a function: called
 * with the text in pieces of about 64 KiB, in order, then true (an error
 * it raises is raised). A file or a function keeps only one piece in
 * memory at a time. */
static int map_to_json(lua_State *L)
{
    ql_map *m = check_map(L, 1);
    luaL_Stream *file = NULL;
    int sink = lua_type(L, 2) == LUA_TFUNCTION;
    size_t len = 0;
    int rc;

    if (!sink && !lua_isnoneornil(L, 2)) {
        file = luaL_checkudata(L, 2, LUA_FILEHANDLE);
        if (file->closef == NULL)
            return luaL_argerror(L, 2, "attempt to use a closed file");
    }
    free(m->json);
    m->json = NULL;
    rc = ql_map_json(&m->store, file ? file->f : NULL,
                     sink ? call_sink : NULL, L, &m->json, &len);
    if (rc == QCOW2_E_NOMEM)
        return ql_push_fail(L, rc, "out of memory writing the map's JSON");
    if (rc < 0) {
        char text[128];
        /* GNU strerror_r (_GNU_SOURCE): thread-safe, returns the text */
        return ql_push_fail(L, rc, "writing the map's JSON failed: %s",
                            strerror_r(errno, text, sizeof text));
    }
    if (file || sink) {
        lua_pushboolean(L, 1);
        return 1;
    }
    lua_pushlstring(L, m->json, len);
    free(m->json);
    m->json = NULL;
    return 1;
}

static int map_gc(lua_State *L)
{
    ql_map *m = check_map(L, 1);
    free(m->json);
    m->json = NULL;
    ql_store_free(&m->store);
    return 0;
}

static int map_tostring(lua_State *L)
{
    ql_map *m = check_map(L, 1);
    lua_pushfstring(L, "qcow2.ClusterMap (%I extents)",
                    (lua_Integer)m->store.count);
    return 1;
}

void ql_map_register(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"extents", map_extents},
        {"stats", map_stats},
        {"to_json", map_to_json},
        {NULL, NULL}
    };
    static const luaL_Reg *const all[] = { methods, NULL };
    static const luaL_Reg metamethods[] = {
        {"__len", map_len},
        {"__gc", map_gc},
        {"__tostring", map_tostring},
        {NULL, NULL}
    };
    ql_register_type(L, QL_MAP, QL_METHODS_MAP, all, metamethods,
                     map_fields);
}
