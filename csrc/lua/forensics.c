/*
 * lua-qcow2 binding: the forensic Image methods, img:owners() and
 * img:residue(). The engine returns C arrays; they are converted here
 * inside a protected call, so that a Lua memory error never leaks them.
 * A snapshot view reads the file of the image it was opened from: its
 * owners and residue are that image's.
 */
#include <string.h>

#include "common.h"

/* The handle whose file the Image at idx reads (a view: its image's). */
static qcow2_image *file_handle(lua_State *L, int idx)
{
    ql_image *q = ql_check_image(L, idx);

    while (q->kind == QL_VIEW && q->from) {
        q = q->from;
        if (!ql_image_live(q))
            luaL_error(L, "attempt to use a closed image");
    }
    return q->img;
}

/* t[key] = array of the lines of text (nothing when text is NULL). */
static void set_lines(lua_State *L, const char *key, const char *text)
{
    lua_Integer n = 0;

    if (!text)
        return;
    lua_newtable(L);
    while (*text) {
        const char *nl = strchr(text, '\n');
        size_t len = nl ? (size_t)(nl - text) : strlen(text);
        lua_pushlstring(L, text, len);
        lua_rawseti(L, -2, ++n);
        text += len + (nl != NULL);
    }
    lua_setfield(L, -2, key);
}

/* Protected: (ranges, count) as light userdata/integer -> the array. */
static int push_owners(lua_State *L)
{
    const qcow2_owner_range *r = lua_touserdata(L, 1);
    lua_Integer n = lua_tointeger(L, 2);

    lua_createtable(L, (int)n, 0);
    for (lua_Integer i = 0; i < n; i++) {
        lua_createtable(L, 0, 8);
        ql_set_int(L, "offset", r[i].offset);
        ql_set_int(L, "length", r[i].length);
        ql_set_str(L, "owner", qcow2_owner_name(r[i].owner));
        if (r[i].detail)
            ql_set_str(L, "detail", r[i].detail);
        if (r[i].has_guest)
            ql_set_int(L, "guest_offset", r[i].guest_offset);
        if (r[i].owner == QCOW2_OWNER_LEAKED)
            ql_set_int(L, "refcount", r[i].refcount);
        if (r[i].flags & QCOW2_OWNER_SLACK)
            ql_set_bool(L, "slack", 1);
        if (r[i].flags & QCOW2_OWNER_SHADOW)
            ql_set_bool(L, "shadow", 1);
        set_lines(L, "views", r[i].views);
        set_lines(L, "problems", r[i].problems);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* push(ranges, count) run protected, so the caller frees the engine's
 * array whatever happens: the pcall status, with the table (or the error)
 * on the stack. */
static int push_protected(lua_State *L, lua_CFunction push, void *ranges,
                          size_t count)
{
    lua_pushcfunction(L, push);
    lua_pushlightuserdata(L, ranges);
    lua_pushinteger(L, (lua_Integer)count);
    return lua_pcall(L, 2, 1, 0);
}

/* img:owners(): every byte of the image file and what owns it. */
static int image_owners(lua_State *L)
{
    qcow2_image *h = file_handle(L, 1);
    qcow2_owner_range *ranges;
    size_t count;
    int rc = qcow2_owners(h, &ranges, &count);

    if (rc < 0)
        return ql_push_engine_error(L, h, rc);
    rc = push_protected(L, push_owners, ranges, count);
    qcow2_owners_free(ranges, count);
    return rc == LUA_OK ? 1 : lua_error(L);
}

static int push_residue(lua_State *L)
{
    const qcow2_residue_range *r = lua_touserdata(L, 1);
    lua_Integer n = lua_tointeger(L, 2);

    lua_createtable(L, (int)n, 0);
    for (lua_Integer i = 0; i < n; i++) {
        lua_createtable(L, 0, 4);
        ql_set_int(L, "offset", r[i].offset);
        ql_set_int(L, "length", r[i].length);
        ql_set_str(L, "kind", qcow2_residue_name(r[i].kind));
        lua_pushnumber(L, r[i].entropy);
        lua_setfield(L, -2, "entropy");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* img:residue(): non-zero bytes of the file that no view reads. */
static int image_residue(lua_State *L)
{
    qcow2_image *h = file_handle(L, 1);
    qcow2_residue_range *ranges;
    size_t count;
    int rc = qcow2_residue(h, &ranges, &count);

    if (rc < 0)
        return ql_push_engine_error(L, h, rc);
    rc = push_protected(L, push_residue, ranges, count);
    qcow2_residue_free(ranges);
    return rc == LUA_OK ? 1 : lua_error(L);
}

const luaL_Reg ql_image_forensics_methods[] = {
    {"owners", image_owners},
    {"residue", image_residue},
    {NULL, NULL}
};
