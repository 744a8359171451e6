/*
 * lua-qcow2 binding: the Snapshot userdata ("qcow2.Snapshot").
 *
 * A Snapshot is a copy of one snapshot table entry taken when it was
 * listed, plus its Image (user value 1) for open/map. Its fields stay
 * readable after the image is closed; methods that touch the image need
 * it open.
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "common.h"

#define QL_UV_IMAGE 1   /* the Image the entry was read from */
#define QL_UV_ID    2   /* id string */
#define QL_UV_NAME  3   /* name string */

typedef struct ql_snapshot {
    uint32_t index;             /* position in the table when listed */
    qcow2_snapshot_info info;   /* id and name NULL: see the user values */
} ql_snapshot;

void ql_snapshot_push(lua_State *L, int image_idx, uint32_t index,
                      const qcow2_snapshot_info *info)
{
    ql_snapshot *s;

    image_idx = lua_absindex(L, image_idx);
    s = lua_newuserdatauv(L, sizeof *s, 3);
    s->index = index;
    s->info = *info;
    s->info.id = NULL;
    s->info.name = NULL;
    lua_pushvalue(L, image_idx);
    lua_setiuservalue(L, -2, QL_UV_IMAGE);
    lua_pushstring(L, info->id ? info->id : "");
    lua_setiuservalue(L, -2, QL_UV_ID);
    lua_pushstring(L, info->name ? info->name : "");
    lua_setiuservalue(L, -2, QL_UV_NAME);
    luaL_setmetatable(L, QL_SNAPSHOT);
}

static ql_snapshot *check_snapshot(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, QL_SNAPSHOT);
}

static int has_icount(const ql_snapshot *s)
{
    /* QEMU stores -1 for "no icount" and prints nothing for it. */
    return s->info.has_icount && s->info.icount != -1;
}

static int snapshot_fields(lua_State *L)
{
    ql_snapshot *s = check_snapshot(L, 1);
    const char *key;

    if (lua_type(L, 2) != LUA_TSTRING) {
        lua_pushnil(L);
        return 1;
    }
    key = lua_tostring(L, 2);
    if (strcmp(key, "id") == 0)
        lua_getiuservalue(L, 1, QL_UV_ID);
    else if (strcmp(key, "name") == 0)
        lua_getiuservalue(L, 1, QL_UV_NAME);
    else if (strcmp(key, "date") == 0)
        ql_push_u64(L, s->info.date_sec);
    else if (strcmp(key, "date_nsec") == 0)
        ql_push_u64(L, s->info.date_nsec);
    else if (strcmp(key, "vm_clock") == 0)
        ql_push_u64(L, s->info.vm_clock_nsec);
    else if (strcmp(key, "vm_state_size") == 0)
        ql_push_u64(L, s->info.vm_state_size);
    else if (strcmp(key, "disk_size") == 0)
        ql_push_u64(L, s->info.disk_size);
    else if (strcmp(key, "icount") == 0 && has_icount(s))
        lua_pushinteger(L, (lua_Integer)s->info.icount);
    else if (strcmp(key, "l1_table_offset") == 0)
        ql_push_u64(L, s->info.l1_table_offset);
    else if (strcmp(key, "l1_size") == 0)
        ql_push_u64(L, s->info.l1_size);
    else if (strcmp(key, "extra_data_size") == 0)
        ql_push_u64(L, s->info.extra_data_size);
    else
        lua_pushnil(L);
    return 1;
}

/*
 * Push the snapshot's open Image (raises when closed) and find the entry's
 * current index: the listed one if it still carries the same id, else a
 * search by id. Returns 1, or 0 with fail, message, code pushed.
 */
static int locate(lua_State *L, ql_snapshot *s, ql_image **image,
                  uint32_t *index)
{
    const char *id;
    qcow2_image *h;
    qcow2_snapshot_info info;
    uint32_t n;
    int rc;

    lua_getiuservalue(L, 1, QL_UV_IMAGE);
    *image = ql_check_image(L, -1);
    lua_getiuservalue(L, 1, QL_UV_ID);
    id = lua_tostring(L, -1);
    lua_pop(L, 1);      /* the string stays alive as a user value */
    h = (*image)->img;
    n = qcow2_snapshot_count(h);
    if (s->index < n && qcow2_snapshot_get(h, s->index, &info) == 0 &&
        info.id && strcmp(info.id, id) == 0) {
        *index = s->index;
        return 1;
    }
    for (uint32_t i = 0; i < n; i++) {
        rc = qcow2_snapshot_get(h, i, &info);
        if (rc < 0) {
            ql_push_engine_error(L, h, rc);
            return 0;
        }
        if (info.id && strcmp(info.id, id) == 0) {
            *index = i;
            return 1;
        }
    }
    ql_push_fail(L, QCOW2_E_NOTFOUND, "%s: snapshot id %s no longer exists",
                 qcow2_path(h), id);
    return 0;
}

/* s:open(): a read-only Image of the disk as it was at the snapshot. */
static int snapshot_open(lua_State *L)
{
    ql_snapshot *s = check_snapshot(L, 1);
    ql_image *parent, *view_ud;
    qcow2_image *view = NULL;
    uint32_t index;
    int parent_idx, rc;

    if (!locate(L, s, &parent, &index))
        return 3;
    parent_idx = lua_gettop(L);
    /* The userdata exists before the engine handle, so a memory error
     * cannot leak the view. */
    view_ud = ql_image_alloc(L, QL_VIEW, parent_idx);
    rc = qcow2_snapshot_open(parent->img, index, &view);
    if (rc < 0)
        return ql_push_engine_error(L, parent->img, rc);
    ql_image_attach(view_ud, view);
    return 1;
}

qcow2_image *ql_snapshot_view(lua_State *L, int image_idx, const char *want)
{
    ql_image *q = ql_check_image(L, image_idx);
    uint32_t n = qcow2_snapshot_count(q->img), found = UINT32_MAX;
    qcow2_snapshot_info info;
    qcow2_image *view = NULL;
    ql_image *ud;
    int rc;

    for (int pass = 0; pass < 2 && found == UINT32_MAX; pass++)
        for (uint32_t i = 0; i < n && found == UINT32_MAX; i++)
            if (qcow2_snapshot_get(q->img, i, &info) == 0 &&
                strcmp(pass == 0 ? info.id : info.name, want) == 0)
                found = i;
    if (found == UINT32_MAX) {
        ql_push_fail(L, QCOW2_E_NOTFOUND, "%s: no snapshot '%s'",
                     qcow2_path(q->img), want);
        return NULL;
    }
    /* The userdata exists before the engine handle, so a memory error
     * cannot leak the view. */
    ud = ql_image_alloc(L, QL_VIEW, image_idx);
    rc = qcow2_snapshot_open(q->img, found, &view);
    if (rc < 0) {
        ql_push_engine_error(L, q->img, rc);
        return NULL;
    }
    ql_image_attach(ud, view);
    return view;
}

/* s:map([offset, length]): the ClusterMap of the snapshot's disk, through
 * a view opened and closed for the call. */
static int snapshot_map(lua_State *L)
{
    ql_snapshot *s = check_snapshot(L, 1);
    uint64_t size = s->info.disk_size;
    uint64_t offset, length, guest_offset, bytes;
    ql_image *parent;
    qcow2_image *view = NULL;
    uint32_t index;
    ql_map *map;
    char msg[QCOW2_ERRMSG_MAX];
    int rc;

    ql_opt_range(L, 2, size, &offset, &length);
    lua_settop(L, 3);
    if (!locate(L, s, &parent, &index))
        return 3;
    if (!ql_clamp_range(L, qcow2_path(parent->img), "map", offset, length,
                        size, &guest_offset, &bytes))
        return 3;
    /* The map exists before the view, so nothing raises while the view
     * is open; it copies the extents, the view closes before we return. */
    map = ql_map_new(L);
    rc = qcow2_snapshot_open(parent->img, index, &view);
    if (rc < 0)
        return ql_push_engine_error(L, parent->img, rc);
    rc = ql_map_fill(map, view, guest_offset, bytes, msg, sizeof msg);
    qcow2_close(view);
    if (rc < 0)
        return ql_push_fail(L, rc, "%s", msg);
    return 1;
}

/* text left-aligned in a field of width columns ("%-*s"). */
static void add_padded(luaL_Buffer *b, const char *text, size_t width)
{
    size_t len = strlen(text);
    luaL_addlstring(b, text, len);
    for (; len < width; len++)
        luaL_addchar(b, ' ');
}

/*
 * The row `qemu-img snapshot -l` prints for the entry (QEMU 7.2
 * bdrv_snapshot_dump): "%-9s %-16s %8s%20s%13s%11s" of id, name, VM size,
 * local date, VM clock and icount.
 */
static int snapshot_tostring(lua_State *L)
{
    ql_snapshot *s = check_snapshot(L, 1);
    const char *id, *name;
    char vm_size[32], date[64] = "", clock[64], icount[32] = "";
    time_t when = (time_t)s->info.date_sec;
    struct tm tm;
    uint64_t secs = s->info.vm_clock_nsec / 1000000000u;
    char tail[256];
    luaL_Buffer row;

    lua_getiuservalue(L, 1, QL_UV_ID);
    id = lua_tostring(L, -1);
    lua_getiuservalue(L, 1, QL_UV_NAME);
    name = lua_tostring(L, -1);
    ql_human_size(vm_size, sizeof vm_size, s->info.vm_state_size);
    if (localtime_r(&when, &tm))
        strftime(date, sizeof date, "%Y-%m-%d %H:%M:%S", &tm);
    snprintf(clock, sizeof clock, "%02d:%02d:%02d.%03d",
             (int)(secs / 3600), (int)((secs / 60) % 60), (int)(secs % 60),
             (int)((s->info.vm_clock_nsec / 1000000u) % 1000));
    if (has_icount(s))
        snprintf(icount, sizeof icount, "%" PRId64, s->info.icount);
    /* id and name can be long (names up to 64 KiB): pad them in a
     * buffer rather than a fixed array. */
    luaL_buffinit(L, &row);
    add_padded(&row, id, 9);
    luaL_addchar(&row, ' ');
    add_padded(&row, name, 16);
    luaL_addchar(&row, ' ');
    snprintf(tail, sizeof tail, "%8s%20s%13s%11s", vm_size, date, clock,
             icount);
    luaL_addstring(&row, tail);
    luaL_pushresult(&row);
    return 1;
}

void ql_snapshot_register(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"open", snapshot_open},
        {"map", snapshot_map},
        {NULL, NULL}
    };
    /* Every Snapshot method, from the files that implement them. */
    static const luaL_Reg *const all[] = {
        methods, ql_snapshot_write_methods, NULL
    };
    static const luaL_Reg metamethods[] = {
        {"__tostring", snapshot_tostring},
        {NULL, NULL}
    };
    ql_register_type(L, QL_SNAPSHOT, QL_METHODS_SNAPSHOT, all,
                     metamethods, snapshot_fields);
}
