/*
 * lua-qcow2 binding: result strings whose length the caller chose (read,
 * raw_read, load_vmstate).
 *
 * Lua's own allocator raises "not enough memory" when a big string cannot
 * be had, and luaL_Buffer allocates through it. The contract wants
 * nil, message, "nomem" instead: the bytes are read into a malloc'd
 * buffer that is checked, and the string is made from it in protected
 * mode, so no allocation failure unwinds out of the method.
 */
#include <stdlib.h>

#include "common.h"

/* Lua strings stop short of MAX_SIZE; beyond half the address space no
 * allocation can succeed anyway. */
#define QL_RESULT_MAX   ((size_t)(SIZE_MAX / 2))

char *ql_result_alloc(lua_State *L, const char *who, size_t length,
                      int *nret)
{
    char *buf = length <= QL_RESULT_MAX ? malloc(length ? length : 1) : NULL;

    if (buf == NULL)
        *nret = ql_push_fail(L, QCOW2_E_NOMEM, "%s: out of memory for a "
                             "result of %zu bytes", who, length);
    return buf;
}

static int push_bytes(lua_State *L)
{
    const char *bytes = lua_touserdata(L, 1);
    size_t length = (size_t)lua_tointeger(L, 2);

    lua_pushlstring(L, bytes, length);
    return 1;
}

int ql_result_push(lua_State *L, const char *who, char *buf, size_t length)
{
    int status = LUA_ERRMEM;

    if (lua_checkstack(L, 3)) {
        lua_pushcfunction(L, push_bytes);
        lua_pushlightuserdata(L, buf);
        lua_pushinteger(L, (lua_Integer)length);
        status = lua_pcall(L, 2, 1, 0);
        if (status != LUA_OK)
            lua_pop(L, 1);  /* the error object */
    }
    free(buf);
    if (status != LUA_OK)
        return ql_push_fail(L, QCOW2_E_NOMEM, "%s: out of memory for a "
                            "result of %zu bytes", who, length);
    return 1;
}
