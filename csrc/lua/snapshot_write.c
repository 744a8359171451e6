/*
 * lua-qcow2 binding: the writing side of internal snapshots.
 *
 * Image:create_snapshot, Image:save_vmstate, Image:load_vmstate (listed
 * in ql_image_snapshot_methods) and Snapshot:apply, Snapshot:delete
 * (ql_snapshot_write_methods), assembled into each type's one method
 * table by image.c and snapshot.c. Read-only handles keep the contract's
 * answer: nil, message, "readonly".
 */
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* User values of a Snapshot userdata (snapshot.c). */
#define QL_SNAP_UV_IMAGE    1
#define QL_SNAP_UV_ID       2
#define QL_SNAP_UV_NAME     3

static int refuse_readonly(lua_State *L, qcow2_image *h, const char *what)
{
    return ql_push_fail(L, QCOW2_E_READONLY,
                        "%s: %s: the image is open read-only",
                        qcow2_path(h), what);
}

/* img:create_snapshot(name [, {vm_state=, vm_clock=, date=, date_nsec=,
 * icount=}]) -> Snapshot | nil, message, code. Values no snapshot entry
 * can hold (a negative clock, a date outside 32 bits) are misuse. */
static int image_create_snapshot(lua_State *L)
{
    static const char *const keys[] = {
        "vm_state", "vm_clock", "date", "date_nsec", "icount", NULL
    };
    static const char *const fn = "create_snapshot";
    ql_image *q = ql_check_image(L, 1);
    const char *name = luaL_checkstring(L, 2);
    qcow2_snapshot_create_opts opts;
    qcow2_snapshot_info info;
    uint32_t index = 0;
    int rc;

    lua_settop(L, 3);
    qcow2_snapshot_create_opts_init(&opts);
    if (ql_opt_options(L, 3, fn, keys)) {
        lua_Integer v;

        if (ql_opt_field(L, 3, fn, "vm_state", LUA_TSTRING) != LUA_TNIL) {
            size_t length;
            /* The string stays on the stack (index 4) during the call. */
            opts.vm_state = lua_tolstring(L, -1, &length);
            opts.vm_state_size = length;
        } else {
            lua_pop(L, 1);
        }
        if (ql_opt_integer(L, 3, fn, "vm_clock", 1, &v))
            opts.vm_clock_nsec = (uint64_t)v;
        if (ql_opt_integer(L, 3, fn, "date", 1, &v)) {
            if (v > 0xffffffffLL)
                return luaL_error(L, "bad option 'date' to '%s' (more than "
                                  "32 bits)", fn);
            opts.has_date = 1;
            opts.date_sec = (uint32_t)v;
        }
        if (ql_opt_integer(L, 3, fn, "date_nsec", 1, &v)) {
            if (v >= 1000000000LL)
                return luaL_error(L, "bad option 'date_nsec' to '%s' (not "
                                  "below 1000000000)", fn);
            opts.date_nsec = (uint32_t)v;
        }
        if (ql_opt_integer(L, 3, fn, "icount", 0, &v)) {
            if (v < -1)     /* -1 is QEMU's "no icount" */
                return luaL_error(L, "bad option 'icount' to '%s' "
                                  "(negative)", fn);
            opts.icount = v;
        }
    }
    if (qcow2_is_read_only(q->img))
        return refuse_readonly(L, q->img, fn);
    rc = qcow2_snapshot_create(q->img, name, &opts, &index);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    rc = qcow2_snapshot_get(q->img, index, &info);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    ql_snapshot_push(L, 1, index, &info);
    return 1;
}

/* img:save_vmstate(pos, data) -> true | nil, message, code */
static int image_save_vmstate(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    uint64_t pos = ql_check_offset(L, 2);
    size_t length;
    const char *data = luaL_checklstring(L, 3, &length);
    int rc;

    if (qcow2_is_read_only(q->img))
        return refuse_readonly(L, q->img, "save_vmstate");
    rc = qcow2_vmstate_save(q->img, pos, data, length);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* img:load_vmstate(pos, length) -> string | nil, message, code. Like read
 * at the end of the disk, the string stops at the end of the last
 * cluster holding VM state ("" from there on): its size is bounded by the
 * image, never by `length` alone. */
static int image_load_vmstate(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    uint64_t pos = ql_check_offset(L, 2);
    uint64_t length = ql_check_length(L, 3);
    uint64_t area = 0, bytes = 0;
    char *out;
    int rc, nret;

    rc = qcow2_vmstate_size(q->img, &area);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    if (pos < area)
        bytes = area - pos < length ? area - pos : length;
    if (bytes == 0) {
        lua_pushliteral(L, "");
        return 1;
    }
    out = ql_result_alloc(L, qcow2_path(q->img), (size_t)bytes, &nret);
    if (out == NULL)
        return nret;
    rc = qcow2_vmstate_load(q->img, pos, out, (size_t)bytes);
    if (rc < 0) {
        free(out);
        return ql_push_engine_error(L, q->img, rc);
    }
    return ql_result_push(L, qcow2_path(q->img), out, (size_t)bytes);
}

/*
 * The open Image of the Snapshot at index 1 (raises when closed) and the
 * entry's current index, matched by id and name: an entry deleted (or an
 * id reused by a later snapshot) is "notfound". Returns 1, or 0 with
 * nil, message, code pushed.
 */
static int locate(lua_State *L, const char *what, ql_image **image,
                  uint32_t *index)
{
    const char *id, *name;
    qcow2_image *h;
    uint32_t n;

    luaL_checkudata(L, 1, QL_SNAPSHOT);
    lua_getiuservalue(L, 1, QL_SNAP_UV_IMAGE);
    *image = ql_check_image(L, -1);
    h = (*image)->img;
    lua_getiuservalue(L, 1, QL_SNAP_UV_ID);
    id = lua_tostring(L, -1);
    lua_getiuservalue(L, 1, QL_SNAP_UV_NAME);
    name = lua_tostring(L, -1);
    lua_pop(L, 2);      /* both stay alive as user values */
    if (qcow2_is_read_only(h)) {
        refuse_readonly(L, h, what);
        return 0;
    }
    n = qcow2_snapshot_count(h);
    for (uint32_t i = 0; i < n; i++) {
        qcow2_snapshot_info info;
        if (qcow2_snapshot_get(h, i, &info) == 0 && info.id && info.name &&
            strcmp(info.id, id) == 0 && strcmp(info.name, name) == 0) {
            *index = i;
            return 1;
        }
    }
    ql_push_fail(L, QCOW2_E_NOTFOUND, "%s: snapshot %s (%s) no longer "
                 "exists", qcow2_path(h), id, name);
    return 0;
}

/* s:apply() -> true | nil, message, code */
static int snapshot_apply(lua_State *L)
{
    ql_image *image;
    uint32_t index;
    int rc;

    if (!locate(L, "apply", &image, &index))
        return 3;
    rc = qcow2_snapshot_apply(image->img, index);
    if (rc < 0)
        return ql_push_engine_error(L, image->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

/* s:delete() -> true | nil, message, code. Refused ("busy") while a
 * snapshot view of the image is open: it could be reading the clusters
 * the delete frees. */
static int snapshot_delete(lua_State *L)
{
    ql_image *image;
    uint32_t index;
    int rc;

    if (!locate(L, "delete", &image, &index))
        return 3;
    if (image->views)
        return ql_push_fail(L, QCOW2_E_BUSY, "%s: delete: close the open "
                            "snapshot views first",
                            qcow2_path(image->img));
    rc = qcow2_snapshot_delete(image->img, index);
    if (rc < 0)
        return ql_push_engine_error(L, image->img, rc);
    lua_pushboolean(L, 1);
    return 1;
}

const luaL_Reg ql_image_snapshot_methods[] = {
    {"create_snapshot", image_create_snapshot},
    {"save_vmstate", image_save_vmstate},
    {"load_vmstate", image_load_vmstate},
    {NULL, NULL}
};

const luaL_Reg ql_snapshot_write_methods[] = {
    {"apply", snapshot_apply},
    {"delete", snapshot_delete},
    {NULL, NULL}
};
