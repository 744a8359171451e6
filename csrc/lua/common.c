/* lua-qcow2 binding: shared helpers (errors, values, types). */
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "common.h"

int ql_push_engine_error(lua_State *L, qcow2_image *h, int status)
{
    const char *msg = h ? qcow2_errmsg(h) : NULL;
    luaL_pushfail(L);
    lua_pushstring(L, msg && *msg ? msg : qcow2_status_name(status));
    lua_pushstring(L, qcow2_status_name(status));
    return 3;
}

int ql_push_error(lua_State *L, const qcow2_error *err)
{
    int code = err->code ? err->code : QCOW2_E_IO;
    luaL_pushfail(L);
    lua_pushstring(L, err->msg[0] ? err->msg : qcow2_status_name(code));
    lua_pushstring(L, qcow2_status_name(code));
    return 3;
}

int ql_push_fail(lua_State *L, int status, const char *fmt, ...)
{
    char msg[QCOW2_ERRMSG_MAX];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    luaL_pushfail(L);
    lua_pushstring(L, msg);
    lua_pushstring(L, qcow2_status_name(status));
    return 3;
}

void ql_push_u64(lua_State *L, uint64_t v)
{
    lua_pushinteger(L, (lua_Integer)v);
}

void ql_set_int(lua_State *L, const char *key, uint64_t v)
{
    ql_push_u64(L, v);
    lua_setfield(L, -2, key);
}

void ql_set_str(lua_State *L, const char *key, const char *s)
{
    lua_pushstring(L, s);
    lua_setfield(L, -2, key);
}

void ql_set_bool(lua_State *L, const char *key, int b)
{
    lua_pushboolean(L, b);
    lua_setfield(L, -2, key);
}

void *ql_gc_box(lua_State *L, size_t size, const char *tname,
                lua_CFunction gc)
{
    void *box = lua_newuserdatauv(L, size, 0);

    memset(box, 0, size);
    if (luaL_newmetatable(L, tname)) {
        lua_pushcfunction(L, gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    return box;
}

void ql_human_size(char *buf, size_t len, uint64_t bytes)
{
    /* QEMU's util/cutils.c size_to_str: switch to the next unit once the
     * integer part would reach 1000, print 3 significant digits. */
    static const char *const suffixes[] = {
        "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"
    };
    int unit = 0;

    /* frexp-free form of QEMU's exponent rule: unit u once bytes reach
     * 1000 * 1024^(u-1). */
    while (unit < 6 && bytes >= (uint64_t)1000 << (10 * unit))
        unit++;
    snprintf(buf, len, "%0.3g %sB",
             (double)bytes / (double)(1ull << (unit * 10)), suffixes[unit]);
}

const char *ql_basename(const char *path)
{
    const char *slash = strrchr(path, '/');
    return slash && slash[1] ? slash + 1 : path;
}

/* __index of every type: methods first (upvalue 1), then the type's
 * field function (upvalue 2) with (ud, key). */
static int ql_index(lua_State *L)
{
    lua_CFunction fields;

    lua_pushvalue(L, 2);
    if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL)
        return 1;
    lua_pop(L, 1);
    fields = lua_tocfunction(L, lua_upvalueindex(2));
    if (fields == NULL) {
        lua_pushnil(L);
        return 1;
    }
    return fields(L);
}

void ql_register_type(lua_State *L, const char *tname,
                      const char *methods_key,
                      const luaL_Reg *const methods[],
                      const luaL_Reg *metamethods, lua_CFunction fields)
{
    if (!luaL_newmetatable(L, tname))       /* mt */
        luaL_error(L, "qcow2: type %s registered twice", tname);
    luaL_setfuncs(L, metamethods, 0);
    lua_newtable(L);                        /* mt methods */
    for (size_t i = 0; methods[i]; i++) {
        for (const luaL_Reg *r = methods[i]; r->name; r++) {
            /* one table, assembled once: nothing overwrites a method */
            if (lua_getfield(L, -1, r->name) != LUA_TNIL)
                luaL_error(L, "qcow2: %s method '%s' registered twice",
                           tname, r->name);
            lua_pop(L, 1);
            lua_pushcfunction(L, r->func);
            lua_setfield(L, -2, r->name);
        }
    }
    lua_pushvalue(L, -1);
    lua_setfield(L, LUA_REGISTRYINDEX, methods_key);
    if (fields)
        lua_pushcfunction(L, fields);
    else
        lua_pushnil(L);
    lua_pushcclosure(L, ql_index, 2);       /* mt __index */
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}
