/*
 * lua-qcow2 binding: persistent dirty bitmaps. img:bitmaps() gives an
 * array of Bitmap userdata ("qcow2.Bitmap"): fields name, granularity,
 * flags (qemu-img info's names: "in-use", "auto"; other bits as "bit N"),
 * type, granularity_bits, table_offset, table_size; bm:extents()
 * iterates the dirty ranges {start=, length=} (engine:
 * csrc/engine/bitmap_extents.c). A Bitmap keeps its Image alive and
 * reads through it, so it is usable while the Image is open.
 */
#include <string.h>

#include "common.h"

#define QL_BITMAP           "qcow2.Bitmap"
#define QL_METHODS_BITMAP   "qcow2.Bitmap.methods"
#define QL_BITMAP_ITER      "qcow2.Bitmap.extents"
#define QL_BITMAP_LIST      "qcow2.Bitmap.list"

typedef struct ql_bitmap {
    qcow2_bitmap_info info;     /* name points at name_buf */
    char name_buf[1024];        /* the format's names are <= 1023 bytes */
} ql_bitmap;

typedef struct ql_bitmap_iter {
    qcow2_bitmap_iter *it;      /* NULL once done or collected */
} ql_bitmap_iter;

/* The open engine handle of the Image at user value 1 of the userdata at
 * idx (raises when that Image is closed). */
static qcow2_image *owner_image(lua_State *L, int idx)
{
    ql_image *q;

    lua_getiuservalue(L, idx, 1);
    q = ql_check_image(L, -1);
    lua_pop(L, 1);                  /* the userdata at idx keeps it alive */
    return q->img;
}

/* ---- img:bitmaps() ------------------------------------------------------- */

static void push_bitmap(lua_State *L, int image_idx,
                        const qcow2_bitmap_info *info)
{
    ql_bitmap *b = lua_newuserdatauv(L, sizeof *b, 1);
    size_t len = strlen(info->name);

    if (len >= sizeof b->name_buf)
        len = sizeof b->name_buf - 1;
    b->info = *info;
    memcpy(b->name_buf, info->name, len);
    b->name_buf[len] = '\0';
    b->info.name = b->name_buf;
    luaL_setmetatable(L, QL_BITMAP);
    lua_pushvalue(L, image_idx);
    lua_setiuservalue(L, -2, 1);
}

/* The engine's list, owned by a userdata until it is copied: a memory
 * error while the result is built does not leak it. */
typedef struct list_box {
    qcow2_bitmap_info *list;
    size_t count;
} list_box;

static int list_box_gc(lua_State *L)
{
    list_box *box = lua_touserdata(L, 1);
    qcow2_bitmap_list_free(box->list, box->count);
    box->list = NULL;
    box->count = 0;
    return 0;
}

static int image_bitmaps(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    list_box *box = lua_newuserdatauv(L, sizeof *box, 0);
    int rc;

    box->list = NULL;
    box->count = 0;
    luaL_setmetatable(L, QL_BITMAP_LIST);
    rc = qcow2_bitmap_list(q->img, &box->list, &box->count);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    lua_createtable(L, box->count > 1024 ? 1024 : (int)box->count, 0);
    for (size_t i = 0; i < box->count; i++) {
        push_bitmap(L, 1, &box->list[i]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* ---- Bitmap fields and extents() ----------------------------------------- */

static void push_flags(lua_State *L, uint32_t flags)
{
    lua_Integer n = 0;

    lua_createtable(L, 2, 0);
    for (int bit = 0; bit < 32; bit++) {
        if (!(flags & (1u << bit)))
            continue;
        if ((1u << bit) == QCOW2_BITMAP_IN_USE)
            lua_pushliteral(L, "in-use");
        else if ((1u << bit) == QCOW2_BITMAP_AUTO)
            lua_pushliteral(L, "auto");
        else
            lua_pushfstring(L, "bit %d", bit);
        lua_rawseti(L, -2, ++n);
    }
}

static int bitmap_fields(lua_State *L)
{
    ql_bitmap *b = luaL_checkudata(L, 1, QL_BITMAP);
    const char *key = lua_tostring(L, 2);

    if (key == NULL)
        lua_pushnil(L);
    else if (strcmp(key, "name") == 0)
        lua_pushstring(L, b->info.name);
    else if (strcmp(key, "granularity") == 0)
        ql_push_u64(L, b->info.granularity);
    else if (strcmp(key, "flags") == 0)
        push_flags(L, b->info.flags);
    else if (strcmp(key, "type") == 0)
        lua_pushinteger(L, b->info.type);
    else if (strcmp(key, "granularity_bits") == 0)
        lua_pushinteger(L, b->info.granularity_bits);
    else if (strcmp(key, "table_offset") == 0)
        ql_push_u64(L, b->info.table_offset);
    else if (strcmp(key, "table_size") == 0)
        lua_pushinteger(L, b->info.table_size);
    else
        lua_pushnil(L);
    return 1;
}

/* The iterator: upvalue 1 is the iterator userdata, whose user value is
 * the Bitmap (and through it the Image). A read failure in the middle of
 * a loop raises: a for loop cannot take nil, message, code. */
static int extents_step(lua_State *L)
{
    ql_bitmap_iter *st = lua_touserdata(L, lua_upvalueindex(1));
    qcow2_image *h;
    uint64_t start, length;
    int rc;

    if (st->it == NULL) {
        lua_pushnil(L);
        return 1;
    }
    lua_getiuservalue(L, lua_upvalueindex(1), 1);      /* the Bitmap */
    h = owner_image(L, -1);
    rc = qcow2_bitmap_extents_next(h, st->it, &start, &length);
    if (rc <= 0) {
        qcow2_bitmap_extents_free(st->it);
        st->it = NULL;
        if (rc < 0)
            return luaL_error(L, "%s", qcow2_errmsg(h));
        lua_pushnil(L);
        return 1;
    }
    lua_createtable(L, 0, 2);
    ql_set_int(L, "start", start);
    ql_set_int(L, "length", length);
    return 1;
}

/* bm:extents(): an iterator over {start=, length=} dirty guest ranges, in
 * order, adjacent dirty granules merged (the last range ends at the disk
 * size). The table is validated first: a damaged bitmap gives nil,
 * message, code here rather than a broken loop. */
static int bitmap_extents(lua_State *L)
{
    ql_bitmap *b = luaL_checkudata(L, 1, QL_BITMAP);
    qcow2_image *h = owner_image(L, 1);
    ql_bitmap_iter *st;
    int rc;

    st = lua_newuserdatauv(L, sizeof *st, 1);
    st->it = NULL;
    luaL_setmetatable(L, QL_BITMAP_ITER);
    lua_pushvalue(L, 1);
    lua_setiuservalue(L, -2, 1);
    rc = qcow2_bitmap_extents_open(h, b->info.name, &st->it);
    if (rc < 0)
        return ql_push_engine_error(L, h, rc);
    lua_pushcclosure(L, extents_step, 1);
    return 1;
}

static int iter_gc(lua_State *L)
{
    ql_bitmap_iter *st = luaL_checkudata(L, 1, QL_BITMAP_ITER);
    qcow2_bitmap_extents_free(st->it);
    st->it = NULL;
    return 0;
}

static int bitmap_tostring(lua_State *L)
{
    ql_bitmap *b = luaL_checkudata(L, 1, QL_BITMAP);
    lua_pushfstring(L, "qcow2.Bitmap (%s, granularity %I)", b->info.name,
                    (lua_Integer)b->info.granularity);
    return 1;
}

const luaL_Reg ql_image_bitmap_methods[] = {
    {"bitmaps", image_bitmaps},
    {NULL, NULL}
};

void ql_bitmap_register(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"extents", bitmap_extents},
        {NULL, NULL}
    };
    static const luaL_Reg *const all[] = { methods, NULL };
    static const luaL_Reg metamethods[] = {
        {"__tostring", bitmap_tostring},
        {NULL, NULL}
    };

    ql_register_type(L, QL_BITMAP, QL_METHODS_BITMAP, all, metamethods,
                     bitmap_fields);
    luaL_newmetatable(L, QL_BITMAP_ITER);
    lua_pushcfunction(L, iter_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, QL_BITMAP_LIST);
    lua_pushcfunction(L, list_box_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
}
