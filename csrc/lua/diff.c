/*
 * lua-qcow2 binding: a:diff(b), the guest ranges that differ between two
 * Images or views (engine: csrc/engine/diff.c).
 */
#include <stdlib.h>

#include "common.h"

/* The ranges, gathered in C: the engine's callback calls no Lua, so a
 * memory error cannot jump out of the engine with its buffers held. The
 * list lives in a userdata whose __gc frees it, so a memory error while
 * the result table is built does not leak it either. */
typedef struct range_list {
    uint64_t (*r)[2];
    size_t n, cap;
    int out_of_memory;          /* the list could not grow */
} range_list;

#define QL_DIFF_LIST "qcow2.diff_list"

static int list_gc(lua_State *L)
{
    range_list *list = lua_touserdata(L, 1);
    free(list->r);
    list->r = NULL;
    return 0;
}

static int collect(void *ctx, uint64_t start, uint64_t length)
{
    range_list *list = ctx;

    if (list->n == list->cap) {
        size_t cap = list->cap ? list->cap * 2 : 64;
        void *grown = realloc(list->r, cap * sizeof *list->r);
        if (!grown) {
            list->out_of_memory = 1;
            return QCOW2_E_NOMEM;
        }
        list->r = grown;
        list->cap = cap;
    }
    list->r[list->n][0] = start;
    list->r[list->n][1] = length;
    list->n++;
    return 0;
}

/*
 * a:diff(b): array of {start=, length=} guest ranges whose bytes differ,
 * at 512-byte sector precision (a sector is listed when any byte in it
 * differs; adjacent sectors are merged; the last range ends at the larger
 * virtual size). Images of different sizes compare as qemu-img compare
 * does: the shorter one reads as zeroes past its end. Ranges are decided
 * from the maps where they can be (both zero, or the same host cluster
 * of the same file), so a diff of two sparse disks reads little.
 * A second value counts the work: {bytes_read =, bytes_by_map =}.
 */
static int image_diff(lua_State *L)
{
    ql_image *qa = ql_check_image(L, 1);
    ql_image *qb = ql_check_image(L, 2);
    range_list *list = ql_gc_box(L, sizeof *list, QL_DIFF_LIST,
                                  list_gc);
    qcow2_diff_stats stats;
    int rc;

    rc = qcow2_diff(qa->img, qb->img, collect, list, &stats);
    if (rc < 0 && list->out_of_memory)
        return ql_push_fail(L, rc, "%s: out of memory for the diff's ranges",
                            qcow2_path(qa->img));
    if (rc < 0)
        return ql_push_engine_error(L, qa->img, rc);
    lua_createtable(L, list->n > (size_t)INT32_MAX ? 0 : (int)list->n, 0);
    for (size_t i = 0; i < list->n; i++) {
        lua_createtable(L, 0, 2);
        ql_set_int(L, "start", list->r[i][0]);
        ql_set_int(L, "length", list->r[i][1]);
        lua_rawseti(L, -2, (lua_Integer)i + 1);
    }
    lua_createtable(L, 0, 2);
    ql_set_int(L, "bytes_read", stats.bytes_read);
    ql_set_int(L, "bytes_by_map", stats.bytes_by_map);
    free(list->r);              /* now, rather than at the next GC */
    list->r = NULL;
    return 2;
}

const luaL_Reg ql_image_diff_methods[] = {
    {"diff", image_diff},
    {NULL, NULL}
};
