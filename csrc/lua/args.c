/*
 * lua-qcow2 binding: the one rule for arguments, shared by every binding
 * function (see the Errors section of the README).
 *
 *   Misuse raises: a call that no image could satisfy (a wrong type, a
 *   negative offset, length or index, an unknown option key, an unknown
 *   value of an enumeration), as luaL_check* and io.open's bad mode do.
 *   What depends on the image or the outside world (an offset past the
 *   end, a size qemu-img would refuse, a missing file) returns nil,
 *   message, code.
 *
 * The option readers (ql_opt_field, ql_opt_bool, ql_opt_integer,
 * ql_opt_choice) live in module.c; the checks of keys, offsets, lengths
 * and ranges live here.
 */
#include <inttypes.h>
#include <string.h>

#include "common.h"

void ql_check_options(lua_State *L, int idx, const char *fn,
                      const char *const known[])
{
    idx = lua_absindex(L, idx);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        int ok = 0;
        lua_pop(L, 1);
        for (int i = 0; known[i] && lua_type(L, -1) == LUA_TSTRING; i++)
            ok |= strcmp(known[i], lua_tostring(L, -1)) == 0;
        if (!ok) {
            lua_pushvalue(L, -1);   /* tostring may not touch the key */
            luaL_error(L, "bad option '%s' to '%s' (unknown option)",
                       luaL_tolstring(L, -1, NULL), fn);
        }
    }
}

int ql_opt_options(lua_State *L, int arg, const char *fn,
                   const char *const known[])
{
    if (lua_isnoneornil(L, arg))
        return 0;
    luaL_checktype(L, arg, LUA_TTABLE);
    ql_check_options(L, arg, fn, known);
    return 1;
}

/* luaL_checkinteger, and a negative value raises naming `what`
 * (luaL_argerror names the function and counts arguments as Lua does). */
static uint64_t check_non_negative(lua_State *L, int arg, const char *what)
{
    lua_Integer v = luaL_checkinteger(L, arg);
    if (v < 0)
        luaL_argerror(L, arg, lua_pushfstring(L, "negative %s %I", what, v));
    return (uint64_t)v;
}

uint64_t ql_check_offset(lua_State *L, int arg)
{
    return check_non_negative(L, arg, "offset");
}

uint64_t ql_check_length(lua_State *L, int arg)
{
    return check_non_negative(L, arg, "length");
}

uint64_t ql_check_index(lua_State *L, int arg)
{
    return check_non_negative(L, arg, "index");
}

uint64_t ql_check_size(lua_State *L, int arg)
{
    return check_non_negative(L, arg, "size");
}

void ql_opt_range(lua_State *L, int arg, uint64_t limit, uint64_t *offset,
                  uint64_t *length)
{
    *offset = lua_isnoneornil(L, arg) ? 0 : ql_check_offset(L, arg);
    if (!lua_isnoneornil(L, arg + 1))
        *length = ql_check_length(L, arg + 1);
    else
        *length = *offset < limit ? limit - *offset : 0;
}

int ql_clamp_range(lua_State *L, const char *who, const char *what,
                   uint64_t offset, uint64_t length, uint64_t limit,
                   uint64_t *out_off, uint64_t *out_len)
{
    if (offset > limit) {
        ql_push_fail(L, QCOW2_E_INVALID,
                     "%s: %s offset %" PRIu64 " is past the end (%" PRIu64
                     " bytes)", who, what, offset, limit);
        return 0;
    }
    *out_off = offset;
    *out_len = length > limit - offset ? limit - offset : length;
    return 1;
}

int ql_check_inside(lua_State *L, const char *who, const char *what,
                    uint64_t offset, uint64_t length, uint64_t limit)
{
    if (offset > limit || length > limit - offset) {
        ql_push_fail(L, QCOW2_E_INVALID, "%s: %s of %" PRIu64 " bytes at "
                     "offset %" PRIu64 " runs past the end of the disk (%"
                     PRIu64 " bytes)", who, what, length, offset, limit);
        return 0;
    }
    return 1;
}
