/*
 * lua-qcow2 binding: img:convert(path, opts), the guest disk (or a
 * snapshot of it) written to a new qcow2 or raw image (engine:
 * csrc/engine/convert.c).
 *
 * The output is made here: qcow2 through qcow2.create with the caller's
 * create options (and the source's size), raw as an empty sparse file of
 * the source's size. opts.cache is the output's cache mode, "unsafe" by
 * default as in qemu-img convert: not synced at all (not even at close);
 * "writeback" or "writethrough": synced before convert returns. The engine then converts in bounded steps; between
 * steps the binding calls opts.progress(done, total) (at the start, at
 * least every half second, and at the end). A failed step, or a progress
 * function that raises, closes and removes the output: the failure is
 * returned (nil, message, code) and the raised error re-raised.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common.h"

#define FN "convert"
#define PROGRESS_INTERVAL 0.5       /* seconds between progress calls */

/* Keys of convert itself; every other known key is a create option. */
static const char *const convert_keys[] = {
    "format", "snapshot", "compress", "progress", "threads",
    /* create options (size is the source's) */
    "version", "compat", "cluster_size", "refcount_bits", "lazy_refcounts",
    "preallocation", "backing_file", "backing_format", "encrypt",
    "extended_l2", "compression_type", "data_file", "data_file_raw",
    "overwrite", "cache", "io", NULL
};
/* What a raw output takes of the create options (threads inflate a
 * compressed source). */
static const char *const raw_keys[] = {
    "format", "snapshot", "progress", "threads", "overwrite", "cache", "io",
    NULL
};

/* The converter and what it holds, freed on every path (a userdata whose
 * __gc frees the converter if an error jumps past the explicit end). */
typedef struct job {
    qcow2_convert *cv;
} job;

#define QL_CONVERT_JOB "qcow2.convert_job"

static int job_gc(lua_State *L)
{
    job *j = lua_touserdata(L, 1);
    qcow2_convert_free(j->cv);
    j->cv = NULL;
    return 0;
}

/* ---- The output ------------------------------------------------------------- */

/* qcow2.create(path, opts without convert's keys, size = size): the Image
 * pushed, or NULL with fail pushed (3 values). */
static qcow2_image *create_qcow2(lua_State *L, const char *path, int opts,
                                 uint64_t size)
{
    static const char *const own[] = {
        "format", "snapshot", "compress", "progress", "threads", NULL
    };
    int t;

    lua_pushcfunction(L, ql_module_create);
    lua_pushstring(L, path);
    lua_newtable(L);
    t = lua_gettop(L);
    if (opts) {
        lua_pushnil(L);
        while (lua_next(L, opts)) {
            int skip = 0;
            for (int i = 0; own[i]; i++)
                skip |= strcmp(lua_tostring(L, -2), own[i]) == 0;
            if (skip) {
                lua_pop(L, 1);
                continue;
            }
            lua_pushvalue(L, -2);
            lua_insert(L, -2);
            lua_settable(L, t);
        }
    }
    lua_pushinteger(L, (lua_Integer)size);
    lua_setfield(L, t, "size");
    /* qemu-img convert -B probes the backing format when -F is absent. */
    lua_getfield(L, t, "backing_file");
    lua_getfield(L, t, "backing_format");
    if (lua_type(L, -2) == LUA_TSTRING && lua_isnil(L, -1)) {
        const char *name = lua_tostring(L, -2), *format;
        char full[4096];
        const char *slash = strrchr(path, '/');
        uint32_t version;
        qcow2_error err;

        if (name[0] == '/' || !slash)
            snprintf(full, sizeof full, "%s", name);
        else
            snprintf(full, sizeof full, "%.*s/%s", (int)(slash - path), path,
                     name);
        memset(&err, 0, sizeof err);
        format = qcow2_probe(full, &version, &err);
        lua_pop(L, 2);
        if (!format) {
            lua_pop(L, 3);
            ql_push_error(L, &err);
            return NULL;
        }
        lua_pushstring(L, format);
        lua_setfield(L, t, "backing_format");
    } else {
        lua_pop(L, 2);
    }
    lua_call(L, 2, 3);
    if (lua_isnil(L, -3))
        return NULL;
    lua_pop(L, 2);
    return ql_check_image(L, -1)->img;
}

/* An empty sparse raw file of `size` bytes, opened read-write (with the
 * caller's fault plan): the Image pushed, or NULL with fail pushed. */
static qcow2_image *create_raw(lua_State *L, const char *path, int opts,
                               uint64_t size)
{
    qcow2_open_opts o;
    qcow2_error err;
    qcow2_image *h = NULL;
    ql_image *q;
    int overwrite = opts ? ql_opt_bool(L, opts, FN, "overwrite") > 0 : 0;
    int fd, rc;

    qcow2_open_opts_init(&o);
    o.read_write = 1;
    o.allow_raw = 1;
    if (opts)
        ql_opt_io(L, opts, FN, &o);
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC |
              (overwrite ? 0 : O_EXCL), 0644);
    if (fd < 0) {
        int e = errno;
        /* The common causes by name (strerror is not thread safe). */
        ql_push_fail(L, e == EEXIST ? QCOW2_E_EXISTS : e == ENOSPC
                     ? QCOW2_E_NOSPC : e == ENOENT ? QCOW2_E_NOTFOUND
                     : QCOW2_E_IO, "%s: %s", path, e == EEXIST ? "File "
                     "exists" : e == ENOENT ? "No such file or directory"
                     : e == ENOSPC ? "No space left on device" : e == EACCES
                     ? "Permission denied" : "could not create the file");
        return NULL;
    }
    rc = ftruncate(fd, (off_t)size);
    close(fd);
    if (rc < 0) {
        ql_push_fail(L, QCOW2_E_IO, "%s: could not set the size", path);
        remove(path);
        return NULL;
    }
    q = ql_image_alloc(L, QL_OWNED, 0);
    memset(&err, 0, sizeof err);
    rc = qcow2_open(path, &o, &h, &err);
    if (rc < 0 || !h) {
        if (err.code == 0)
            err.code = rc < 0 ? rc : QCOW2_E_IO;
        remove(path);
        ql_push_error(L, &err);
        return NULL;
    }
    ql_image_attach(q, h);
    return h;
}

/* A create option given with raw output raises (misuse): raw files have
 * no cluster size, backing file or compression. */
static void check_raw_keys(lua_State *L, int opts)
{
    lua_pushnil(L);
    while (lua_next(L, opts)) {
        int ok = 0;
        lua_pop(L, 1);
        for (int i = 0; raw_keys[i]; i++)
            ok |= strcmp(raw_keys[i], lua_tostring(L, -1)) == 0;
        if (!ok)
            luaL_error(L, "bad option '%s' to '" FN "' (not an option of "
                       "raw output)", lua_tostring(L, -1));
    }
}

/* ---- The loop -------------------------------------------------------------- */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* progress(done, total) under pcall: 1, or 0 with the error value on the
 * stack top. */
static int call_progress(lua_State *L, int fn_idx, qcow2_convert *cv)
{
    uint64_t done, total;

    if (!fn_idx)
        return 1;
    qcow2_convert_progress(cv, &done, &total);
    lua_pushvalue(L, fn_idx);
    lua_pushinteger(L, (lua_Integer)done);
    lua_pushinteger(L, (lua_Integer)total);
    return lua_pcall(L, 2, 0, 0) == LUA_OK;
}

/* The converter freed, the snapshot view (if any) and the output closed;
 * the output removed when remove_path is given (a failed convert). */
static void end_job(lua_State *L, job *j, int view_idx, ql_image *out,
                    const char *remove_path)
{
    qcow2_convert_free(j->cv);
    j->cv = NULL;
    if (view_idx)
        ql_image_close(ql_to_image(L, view_idx));
    ql_image_close(out);
    if (remove_path)
        remove(remove_path);
}

/* img:convert(path [, opts]) -> true | nil, message, code */
static int image_convert(lua_State *L)
{
    static const char *const formats[] = { "qcow2", "raw", NULL };
    ql_image *q = ql_check_image(L, 1);
    const char *path = luaL_checkstring(L, 2);
    int opts = ql_opt_options(L, 3, FN, convert_keys) ? 3 : 0;
    int raw = 0, progress_idx = 0, view_idx = 0, out_idx, rc;
    qcow2_convert_opts co;
    qcow2_image *src = q->img, *dst;
    ql_image *out;
    lua_Integer threads = 0;
    double last;
    job *j;

    lua_settop(L, 3);
    memset(&co, 0, sizeof co);
    /* qemu-img convert's default cache mode for the output is "unsafe":
     * never synced (a crash means converting again). "writeback" or
     * "writethrough" make the output durable when convert returns. */
    co.unsafe = 1;
    if (opts) {
        int cache = ql_opt_choice(L, opts, FN, "cache", ql_cache_modes);
        co.unsafe = cache < 0 || strcmp(ql_cache_modes[cache], "unsafe") == 0;
        raw = ql_opt_choice(L, opts, FN, "format", formats) == 1;
        if (raw)
            check_raw_keys(L, opts);
        co.compress = ql_opt_bool(L, opts, FN, "compress") > 0;
        if (ql_opt_integer(L, opts, FN, "threads", 1, &threads))
            co.threads = threads > 64 ? 64 : (int)threads;
        if (ql_opt_field(L, opts, FN, "progress", LUA_TFUNCTION) != LUA_TNIL)
            progress_idx = lua_gettop(L);
        else
            lua_pop(L, 1);
        switch (lua_getfield(L, opts, "snapshot")) {
        case LUA_TNIL:
            lua_pop(L, 1);
            break;
        case LUA_TSTRING:
        case LUA_TNUMBER:
            /* an id given as a number: "1" */
            src = ql_snapshot_view(L, 1, lua_tostring(L, -1));
            if (!src)
                return 3;
            view_idx = lua_gettop(L);
            break;
        default:
            return luaL_error(L, "bad option 'snapshot' to '" FN "' (string "
                              "or integer expected, got %s)",
                              luaL_typename(L, -1));
        }
        co.only_differences = lua_getfield(L, opts, "backing_file") ==
                              LUA_TSTRING;
        lua_pop(L, 1);
    }
    if (co.compress && raw)
        return luaL_error(L, "bad option 'compress' to '" FN "' (raw output "
                          "cannot be compressed)");

    dst = raw ? create_raw(L, path, opts, qcow2_virtual_size(src))
              : create_qcow2(L, path, opts, qcow2_virtual_size(src));
    if (!dst) {
        if (view_idx)
            ql_image_close(ql_to_image(L, view_idx));
        return 3;
    }
    out_idx = lua_gettop(L);
    out = ql_to_image(L, out_idx);
    j = ql_gc_box(L, sizeof *j, QL_CONVERT_JOB, job_gc);
    rc = qcow2_convert_begin(src, dst, &co, &j->cv);
    if (rc < 0) {
        lua_pushstring(L, qcow2_errmsg(dst));
        lua_pushstring(L, qcow2_status_name(rc));
        goto failed;
    }
    if (!call_progress(L, progress_idx, j->cv))
        goto raised;
    last = now();
    while ((rc = qcow2_convert_step(j->cv)) > 0) {
        if (progress_idx && now() - last >= PROGRESS_INTERVAL) {
            if (!call_progress(L, progress_idx, j->cv))
                goto raised;
            last = now();
        }
    }
    if (rc < 0) {
        lua_pushstring(L, qcow2_convert_errmsg(j->cv));
        lua_pushstring(L, qcow2_status_name(rc));
        goto failed;
    }
    if (!call_progress(L, progress_idx, j->cv))
        goto raised;
    end_job(L, j, view_idx, out, NULL);
    lua_pushboolean(L, 1);
    return 1;

failed:     /* message and code on the stack */
    end_job(L, j, view_idx, out, path);
    luaL_pushfail(L);
    lua_insert(L, -3);
    return 3;

raised:     /* the progress function's error on the stack */
    end_job(L, j, view_idx, out, path);
    return lua_error(L);
}

const luaL_Reg ql_image_convert_methods[] = {
    {"convert", image_convert},
    {NULL, NULL}
};
