/*
 * lua-qcow2 binding: img:rebase(backing_file [, {format =, unsafe =}]) and
 * img:commit(), listed in ql_image_lifecycle_methods for image.c to
 * assemble. Both replace the engine's backing handles: the backing Image
 * userdata handed out before (img:backing() and what came from it) is
 * closed, and both are refused ("busy") while snapshot views of the image
 * are open (they borrow the chain).
 */
#include "common.h"

/* The cached img:backing() userdata no longer names a live handle. */
static void forget_backing(lua_State *L, int idx)
{
    if (lua_getiuservalue(L, idx, QL_UV_BACKING) == LUA_TUSERDATA)
        ql_image_close(lua_touserdata(L, -1));
    lua_pop(L, 1);
    lua_pushnil(L);
    lua_setiuservalue(L, idx, QL_UV_BACKING);
}

static ql_image *chain_target(lua_State *L, const char *what)
{
    ql_image *q = ql_writable_image(L, 1, what);

    if (q && q->views) {
        ql_push_fail(L, QCOW2_E_BUSY, "%s: %s: snapshot views of the "
                     "image are open (they share its backing chain)",
                     qcow2_path(q->img), what);
        return NULL;
    }
    return q;
}

/* img:rebase(backing_file [, opts]) -> true | nil, message, code.
 * backing_file nil or "" removes the backing file. */
static int image_rebase(lua_State *L)
{
    static const char *const keys[] = { "format", "unsafe", NULL };
    static const char *const formats[] = { "qcow2", "raw", NULL };
    const char *name = luaL_optstring(L, 2, NULL);
    const char *format = NULL;
    int unsafe = 0, rc;
    ql_image *q;

    ql_check_image(L, 1);
    if (ql_opt_options(L, 3, "rebase", keys)) {
        int f = ql_opt_choice(L, 3, "rebase", "format", formats);
        format = f < 0 ? NULL : formats[f];
        unsafe = ql_opt_bool(L, 3, "rebase", "unsafe") > 0;
    }
    if ((q = chain_target(L, "rebase")) == NULL)
        return 3;
    rc = qcow2_rebase(q->img, name, format, unsafe);
    /* even a failed call may have swapped nothing; a successful one did */
    if (rc == 0)
        forget_backing(L, 1);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* img:commit() -> true | nil, message, code */
static int image_commit(lua_State *L)
{
    ql_image *q = chain_target(L, "commit");
    int rc;

    if (q == NULL)
        return 3;
    /* the backing handle is reopened whatever happens */
    forget_backing(L, 1);
    rc = qcow2_commit(q->img);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

const luaL_Reg ql_image_lifecycle_methods[] = {
    {"rebase", image_rebase},
    {"commit", image_commit},
    {NULL, NULL}
};
