/*
 * lua-qcow2 binding: img:check() and the CheckResult userdata
 * ("qcow2.CheckResult").
 *
 * The engine's result (counts and findings) is copied into the userdata
 * once; the result does not keep the Image alive and stays readable after
 * the image is closed. user value 1 is the file name qemu-img would print.
 * img:check is listed in ql_image_check_methods, which image.c assembles
 * into the Image methods.
 */
#include <stdio.h>
#include <string.h>

#include "common.h"

#define QL_UV_FILENAME      1

typedef struct ql_check {
    qcow2_check_result res;     /* findings freed by __gc */
} ql_check;

static const char *const finding_kind_names[] = {
    "corruption", "leak", "check_error", "repaired", "strict"
};

static const char *finding_kind_name(int kind)
{
    if (kind >= 0 && kind <= QCOW2_FINDING_STRICT)
        return finding_kind_names[kind];
    return "unknown";
}

static ql_check *check_result(lua_State *L, int idx)
{
    return luaL_checkudata(L, idx, QL_CHECK);
}

/* ---- img:check([{repair = "leaks" | "all"}]) ------------------------------- */

/* opts.repair: nil or false (none), "leaks" or "all"; anything else is
 * misuse and raises. */
static int parse_repair(lua_State *L, int idx)
{
    static const char *const keys[] = { "repair", NULL };
    static const char *const modes[] = { "leaks", "all", NULL };
    int mode = QCOW2_REPAIR_NONE;

    if (!ql_opt_options(L, idx, "check", keys))
        return mode;
    if (lua_getfield(L, idx, "repair") == LUA_TBOOLEAN &&
        !lua_toboolean(L, -1)) {
        lua_pop(L, 1);
        return mode;
    }
    lua_pop(L, 1);
    switch (ql_opt_choice(L, idx, "check", "repair", modes)) {
    case 0: mode = QCOW2_REPAIR_LEAKS; break;
    case 1: mode = QCOW2_REPAIR_ALL; break;
    default: break;
    }
    return mode;
}

static int image_check(lua_State *L)
{
    ql_image *q = ql_check_image(L, 1);
    int repair = parse_repair(L, 2);
    ql_check *c;
    int rc;

    if (repair != QCOW2_REPAIR_NONE && qcow2_is_read_only(q->img))
        return ql_push_fail(L, QCOW2_E_READONLY, "%s: cannot repair a "
                            "read-only image (open it with mode = \"rw\")",
                            qcow2_path(q->img));
    /* the userdata first: nothing can raise once the engine result
     * exists, so it cannot leak */
    c = lua_newuserdatauv(L, sizeof *c, 1);
    memset(c, 0, sizeof *c);
    luaL_setmetatable(L, QL_CHECK);
    lua_pushstring(L, qcow2_path(q->img));
    lua_setiuservalue(L, -2, QL_UV_FILENAME);
    rc = qcow2_check(q->img, repair, &c->res);
    if (rc < 0)
        return ql_push_engine_error(L, q->img, rc);
    return 1;
}

/* ---- Fields ------------------------------------------------------------------ */

static int result_ok(const qcow2_check_result *r)
{
    return r->corruptions == 0 && r->leaks == 0 && r->check_errors == 0;
}

static int check_fields(lua_State *L)
{
    const qcow2_check_result *r = &check_result(L, 1)->res;
    const char *key = lua_tostring(L, 2);
    static const struct { const char *name; size_t offset; } counts[] = {
        {"corruptions", offsetof(qcow2_check_result, corruptions)},
        {"leaks", offsetof(qcow2_check_result, leaks)},
        {"check_errors", offsetof(qcow2_check_result, check_errors)},
        {"corruptions_fixed",
         offsetof(qcow2_check_result, corruptions_fixed)},
        {"leaks_fixed", offsetof(qcow2_check_result, leaks_fixed)},
        {"image_end_offset", offsetof(qcow2_check_result, image_end_offset)},
        {"total_clusters", offsetof(qcow2_check_result, total_clusters)},
        {"allocated_clusters",
         offsetof(qcow2_check_result, allocated_clusters)},
        {"fragmented_clusters",
         offsetof(qcow2_check_result, fragmented_clusters)},
        {"compressed_clusters",
         offsetof(qcow2_check_result, compressed_clusters)},
        {"findings_dropped", offsetof(qcow2_check_result, findings_dropped)},
    };

    if (lua_type(L, 2) != LUA_TSTRING) {
        lua_pushnil(L);
        return 1;
    }
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++) {
        if (strcmp(key, counts[i].name) == 0) {
            uint64_t value;
            memcpy(&value, (const char *)r + counts[i].offset, sizeof value);
            ql_push_u64(L, value);
            return 1;
        }
    }
    if (strcmp(key, "ok") == 0)
        lua_pushboolean(L, result_ok(r));
    else if (strcmp(key, "filename") == 0)
        lua_getiuservalue(L, 1, QL_UV_FILENAME);
    else if (strcmp(key, "format") == 0)
        lua_pushliteral(L, "qcow2");
    else
        lua_pushnil(L);
    return 1;
}

/* ---- Findings ------------------------------------------------------------------ */

static void push_finding(lua_State *L, const qcow2_finding *f)
{
    lua_createtable(L, 0, 4);
    ql_set_str(L, "kind", finding_kind_name(f->kind));
    ql_set_int(L, "offset", f->offset);
    ql_set_int(L, "cluster", f->cluster);
    ql_set_str(L, "message", f->message);
}

static int findings_iter(lua_State *L)
{
    const qcow2_check_result *r =
        &check_result(L, lua_upvalueindex(1))->res;
    lua_Integer next = lua_tointeger(L, lua_upvalueindex(2));

    if (next < 0 || (uint64_t)next >= r->finding_count)
        return 0;
    lua_pushinteger(L, next + 1);
    lua_replace(L, lua_upvalueindex(2));
    push_finding(L, &r->findings[next]);
    return 1;
}

/* for f in r:findings() do ... end */
static int check_findings(lua_State *L)
{
    check_result(L, 1);
    lua_pushvalue(L, 1);
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, findings_iter, 2);
    return 1;
}

/* ---- Text ---------------------------------------------------------------------- */

/* What `qemu-img check` prints on stdout (qemu-img.c's
 * dump_human_image_check, with the repair preamble), without the last
 * newline. */
static int check_tostring(lua_State *L)
{
    const qcow2_check_result *r = &check_result(L, 1)->res;
    luaL_Buffer b;
    char line[256];

    luaL_buffinit(L, &b);
    if (r->leaks_fixed || r->corruptions_fixed) {
        snprintf(line, sizeof line, "The following inconsistencies were "
                 "found and repaired:\n\n    %llu leaked clusters\n    %llu "
                 "corruptions\n\nDouble checking the fixed image now...\n",
                 (unsigned long long)r->leaks_fixed,
                 (unsigned long long)r->corruptions_fixed);
        luaL_addstring(&b, line);
    }
    if (result_ok(r)) {
        luaL_addstring(&b, "No errors were found on the image.\n");
    } else {
        if (r->corruptions) {
            snprintf(line, sizeof line, "\n%llu errors were found on the "
                     "image.\nData may be corrupted, or further writes to "
                     "the image may corrupt it.\n",
                     (unsigned long long)r->corruptions);
            luaL_addstring(&b, line);
        }
        if (r->leaks) {
            snprintf(line, sizeof line, "\n%llu leaked clusters were found "
                     "on the image.\nThis means waste of disk space, but no "
                     "harm to data.\n", (unsigned long long)r->leaks);
            luaL_addstring(&b, line);
        }
        if (r->check_errors) {
            snprintf(line, sizeof line, "\n%llu internal errors have "
                     "occurred during the check.\n",
                     (unsigned long long)r->check_errors);
            luaL_addstring(&b, line);
        }
    }
    if (r->total_clusters != 0 && r->allocated_clusters != 0) {
        snprintf(line, sizeof line, "%llu/%llu = %0.2f%% allocated, "
                 "%0.2f%% fragmented, %0.2f%% compressed clusters\n",
                 (unsigned long long)r->allocated_clusters,
                 (unsigned long long)r->total_clusters,
                 (double)r->allocated_clusters * 100.0 /
                     (double)r->total_clusters,
                 (double)r->fragmented_clusters * 100.0 /
                     (double)r->allocated_clusters,
                 (double)r->compressed_clusters * 100.0 /
                     (double)r->allocated_clusters);
        luaL_addstring(&b, line);
    }
    snprintf(line, sizeof line, "Image end offset: %llu",
             (unsigned long long)r->image_end_offset);
    luaL_addstring(&b, line);
    luaL_pushresult(&b);
    return 1;
}

static int check_gc(lua_State *L)
{
    qcow2_check_result_free(&check_result(L, 1)->res);
    return 0;
}

/* ---- Registration -------------------------------------------------------------- */

const luaL_Reg ql_image_check_methods[] = {
    {"check", image_check},
    {NULL, NULL}
};

void ql_check_result_register(lua_State *L)
{
    static const luaL_Reg methods[] = {
        {"findings", check_findings},
        {NULL, NULL}
    };
    static const luaL_Reg *const all[] = { methods, NULL };
    static const luaL_Reg metamethods[] = {
        {"__gc", check_gc},
        {"__tostring", check_tostring},
        {NULL, NULL}
    };

    ql_register_type(L, QL_CHECK, QL_METHODS_CHECK, all, metamethods,
                     check_fields);
}
