/*
 * lua-qcow2 binding: what the per-type files (image.c, snapshot.c, map.c,
 * module.c) share. The binding holds no format logic: it checks arguments,
 * calls csrc/qcow2.h and turns engine failures into nil, message, code.
 */
#ifndef QCOW2_LUA_COMMON_H
#define QCOW2_LUA_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <lua.h>
#include <lauxlib.h>

#include "../qcow2.h"

/* One metatable per userdata type, registered once under these names. */
#define QL_IMAGE        "qcow2.Image"
#define QL_SNAPSHOT     "qcow2.Snapshot"
#define QL_MAP          "qcow2.ClusterMap"

/*
 * How an Image userdata relates to the engine handle it wraps.
 *
 *   QL_OWNED    qcow2.open's result: closing it releases the engine handle
 *               and, inside the engine, the whole backing chain.
 *   QL_BACKING  img:backing(): the handle belongs to `from`'s chain. It is
 *               usable only while every image up the `from` chain is; its
 *               own close or __gc never frees anything.
 *   QL_VIEW     Snapshot:open(): a handle of its own that borrows the file
 *               of `from`; the owner of the chain closes it first.
 */
enum ql_kind { QL_OWNED, QL_BACKING, QL_VIEW };

typedef struct ql_image ql_image;
struct ql_image {
    qcow2_image *img;       /* NULL once closed */
    int kind;               /* enum ql_kind */
    ql_image *from;         /* BACKING/VIEW: the Image it came from; its
                               userdata is user value 1, so it outlives us */
    /* Snapshot views opened on this handle's chain (OWNED/VIEW only):
     * they must be closed before this handle is. Plain C links, so close
     * never allocates or raises; a view unlinks itself when it closes. */
    ql_image *views;
    ql_image *next_view;
    ql_image **prev_view;   /* the link pointing at us, NULL if unlinked */
};

/* User values of an Image userdata. */
#define QL_UV_FROM      1   /* the Image this one came from (or nil) */
#define QL_UV_BACKING   2   /* cached img:backing() userdata (or nil) */

/* --- Image handles (image.c) ------------------------------------------ */
/* Push a new Image userdata wrapping h. from_idx: stack index of the Image
 * it came from (0 for QL_OWNED). A VIEW is linked into the view list of
 * the handle that owns the chain. Raises only on memory errors, and only
 * before h is stored: on such an error the caller's h would leak, so the
 * caller creates the userdata first (ql_image_alloc) when h is fresh. */
ql_image *ql_image_alloc(lua_State *L, int kind, int from_idx);
void ql_image_attach(ql_image *q, qcow2_image *h);
/* The Image at idx, open (raises "attempt to use a closed image"). */
ql_image *ql_check_image(lua_State *L, int idx);
/* The Image at idx, open or not (raises on another type only). */
ql_image *ql_to_image(lua_State *L, int idx);
int ql_image_live(const ql_image *q);
/* Close q's handle (idempotent, never raises). */
void ql_image_close(ql_image *q);
void ql_image_register(lua_State *L);

/* --- Snapshots (snapshot.c) ---------------------------------------------- */
/* Push a Snapshot of entry `index` of the Image at image_idx. */
void ql_snapshot_push(lua_State *L, int image_idx, uint32_t index,
                      const qcow2_snapshot_info *info);
void ql_snapshot_register(lua_State *L);
/* The snapshot `want` (an id or a name, ids first as qemu-img does) of
 * the Image at image_idx opened as a view pushed on the stack: returns its
 * handle, or NULL with fail, message, code pushed (3 values). */
qcow2_image *ql_snapshot_view(lua_State *L, int image_idx, const char *want);

/* --- A map's extents, compact (map_store.c) ------------------------------- */
typedef struct ql_store_mark {
    size_t pos;                 /* a record's first byte */
    uint64_t start, off_base;   /* the decoder's state there */
} ql_store_mark;
typedef struct ql_store_cursor {
    size_t index, pos;          /* the next record */
    uint64_t start, off_base;
} ql_store_cursor;
typedef struct ql_extent_store {
    uint8_t *bytes;             /* the records */
    size_t len, cap;
    size_t count;               /* extents */
    ql_store_mark *marks;       /* one per STORE_MARK extents */
    size_t nmarks, marks_cap;
    char **reasons;             /* corrupt extents' reasons, copied */
    size_t nreasons, reasons_cap;
    uint64_t next_start, off_base;  /* the encoder's state */
    ql_store_cursor cursor;     /* ql_store_get's, for in-order access */
    int cursor_set;
} ql_extent_store;
/* Append a copy of e (its reason copied too). 0 or QCOW2_E_NOMEM (the
 * store unchanged). */
int ql_store_add(ql_extent_store *s, const qcow2_extent *e);
/* Extent index (0-based) into e: 1, or 0 past the end. e->reason points
 * into the store. */
int ql_store_get(ql_extent_store *s, size_t index, qcow2_extent *e);
/* A cursor at extent index (0 for a walk from the start), and the next
 * extent from it: 1, or 0 at the end. */
void ql_store_begin(const ql_extent_store *s, size_t index,
                    ql_store_cursor *c);
int ql_store_next(const ql_extent_store *s, ql_store_cursor *c,
                  qcow2_extent *e);
void ql_store_free(ql_extent_store *s);

/* --- Cluster maps (map.c) -------------------------------------------------- */
typedef struct ql_map ql_map;
/* Push an empty ClusterMap. It keeps no reference to the image it is
 * filled from (a map outlives its Image). May raise (memory). */
ql_map *ql_map_new(lua_State *L);
/* Collect the extents of guest [offset, offset+length) of h into m. Calls
 * no Lua, so it is safe while a borrowed engine handle is open. Returns 0,
 * or a negative status with its one-line message copied into msg
 * (QCOW2_E_NOMEM when the extent array could not grow). */
int ql_map_fill(ql_map *m, qcow2_image *h, uint64_t offset, uint64_t length,
                char *msg, size_t msg_len);
/* ql_map_new + ql_map_fill: returns 1 with the map pushed, or 3 (fail,
 * message, code). */
int ql_map_push(lua_State *L, qcow2_image *h, uint64_t offset,
                uint64_t length);
void ql_map_register(lua_State *L);
/* A piece of to_json's text handed on: 0, or a status that stops it. */
typedef int (*ql_json_sink)(void *ctx, const char *text, size_t len);
/* The records of `qemu-img map --output=json` for the store's extents,
 * merged as qemu-img merges them, in its layout (no final newline); a
 * corrupt extent is a record of its own with "corrupt": true and its
 * "reason". The text is built in *out (NULL on entry; realloc'd there,
 * so a sink that raises leaves it for the caller to free). With neither
 * file nor sink it stays in *out (caller frees, *out_len bytes);
 * otherwise it goes to file, or to sink, in pieces of about 64 KiB, and
 * *out is freed. Calls no Lua itself. Returns 0, QCOW2_E_NOMEM,
 * QCOW2_E_IO (errno set) or the sink's status (map_json.c). */
int ql_map_json(const ql_extent_store *store, FILE *file, ql_json_sink sink,
                void *ctx, char **out, size_t *out_len);

/* --- Module functions and options (module.c, create.c) ------------------- */
/* qcow2.create(path, opts) (create.c). */
int ql_module_create(lua_State *L);
/* Option readers shared by open and create: `fn` names the function in
 * the error raised on a value of the wrong type (misuse raises). */
int ql_opt_field(lua_State *L, int opts, const char *fn, const char *name,
                 int type);                 /* pushes the value */
int ql_opt_bool(lua_State *L, int opts, const char *fn, const char *name);
int ql_opt_integer(lua_State *L, int opts, const char *fn, const char *name,
                   int non_negative, lua_Integer *out);
int ql_opt_choice(lua_State *L, int opts, const char *fn, const char *name,
                  const char *const choices[]);
/* The values of the `cache` option (open, create). */
extern const char *const ql_cache_modes[];
/* opts.io, the fault plan for tests, into o. */
void ql_opt_io(lua_State *L, int opts, const char *fn, qcow2_open_opts *o);

/* --- Method lists ------------------------------------------------------------ */
/* Each file exports the methods it implements; ql_image_register and
 * ql_snapshot_register assemble each type's one table from them, once
 * (a name given twice is a build mistake and raises at load). */
extern const luaL_Reg ql_image_write_methods[];     /* write.c: write,
    write_zeroes, discard, write_compressed, flush, resize, raw_read,
    raw_write, io_log, stats */
extern const luaL_Reg ql_image_check_methods[];     /* check.c: check */
extern const luaL_Reg ql_image_snapshot_methods[];  /* snapshot_write.c:
    create_snapshot, save_vmstate, load_vmstate */
extern const luaL_Reg ql_snapshot_write_methods[];  /* snapshot_write.c:
    apply, delete */
extern const luaL_Reg ql_image_amend_methods[];     /* amend.c: amend,
    make_empty */
extern const luaL_Reg ql_image_diff_methods[];      /* diff.c: diff */
extern const luaL_Reg ql_image_convert_methods[];   /* convert.c: convert */
/* Module functions of compare.c (compare, measure), added to qcow2.core. */
extern const luaL_Reg ql_module_compare_functions[];
extern const luaL_Reg ql_image_bitmap_methods[];    /* bitmap.c: bitmaps */
/* Register the "qcow2.Bitmap" type (bitmap.c). */
void ql_bitmap_register(lua_State *L);
extern const luaL_Reg ql_image_digest_methods[];    /* digest.c: digest */
extern const luaL_Reg ql_image_forensics_methods[]; /* forensics.c:
    owners, residue */
extern const luaL_Reg ql_image_lifecycle_methods[]; /* lifecycle.c:
    rebase, commit */

/* The open handle of an Image that may be written: raises when closed,
 * returns NULL with fail, message, "readonly" pushed (3 values) when the
 * handle is read-only (mode "r", a backing image, a snapshot view). */
ql_image *ql_writable_image(lua_State *L, int idx, const char *what);

/* --- Check results (check.c) ------------------------------------------------ */
#define QL_CHECK            "qcow2.CheckResult"
#define QL_METHODS_CHECK    "qcow2.CheckResult.methods"
/* Register the "qcow2.CheckResult" type. */
void ql_check_result_register(lua_State *L);

/* --- Errors ------------------------------------------------------------------ */
/* nil, qcow2_errmsg(h), code name of status: returns 3. */
int ql_push_engine_error(lua_State *L, qcow2_image *h, int status);
/* nil, message, code name from an error struct: returns 3. */
int ql_push_error(lua_State *L, const qcow2_error *err);
/* nil, formatted message, code name of status: returns 3. */
int ql_push_fail(lua_State *L, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* --- Result strings of a caller-chosen length (result.c) ---------------- */
/* A malloc'd buffer for a result of `length` bytes, or NULL with nil,
 * message naming `who`, "nomem" pushed and *nret = 3. */
char *ql_result_alloc(lua_State *L, const char *who, size_t length,
                      int *nret);
/* Push buf[0, length) as a string and free buf: returns 1, or 3 (nil,
 * message, "nomem") when Lua cannot allocate the string. */
int ql_result_push(lua_State *L, const char *who, char *buf, size_t length);

/* --- Values ---------------------------------------------------------------- */
/* A 64-bit unsigned engine value as a Lua integer (the same bits: values
 * with bit 63 set, such as L2 entries with QCOW_OFLAG_COPIED, come out
 * negative, and bit operations on them work as on the raw entry). */
void ql_push_u64(lua_State *L, uint64_t v);
void ql_set_int(lua_State *L, const char *key, uint64_t v);
void ql_set_str(lua_State *L, const char *key, const char *s);
void ql_set_bool(lua_State *L, const char *key, int b);

/* --- Arguments: the misuse rule (args.c) --------------------------------- */
/*
 * Misuse raises (a call no image could satisfy: wrong type, negative
 * offset/length/index/size, unknown option key, unknown enumeration
 * value); what depends on the image or the outside world returns nil,
 * message, code. Every binding function checks its arguments with these
 * before it looks at the image.
 */
/* Raise unless every key of the table at idx is a string in `known`
 * (NULL terminated): "bad option 'moed' to 'open' (unknown option)". */
void ql_check_options(lua_State *L, int idx, const char *fn,
                      const char *const known[]);
/* An optional options table argument: 0 when none or nil, 1 when it is a
 * table whose keys pass ql_check_options; any other type raises. */
int ql_opt_options(lua_State *L, int arg, const char *fn,
                   const char *const known[]);
/* An integer argument that may not be negative (raises otherwise). */
uint64_t ql_check_offset(lua_State *L, int arg);
uint64_t ql_check_length(lua_State *L, int arg);
uint64_t ql_check_index(lua_State *L, int arg);
uint64_t ql_check_size(lua_State *L, int arg);
/* The optional (offset, length) arguments at arg, arg + 1 of a call over
 * [0, limit): offset defaults to 0, length to the rest of [0, limit)
 * from offset (0 past it). Negative values raise. */
void ql_opt_range(lua_State *L, int arg, uint64_t limit, uint64_t *offset,
                  uint64_t *length);
/* A read-like range against `limit` bytes: an offset past limit returns 0
 * with fail, message, "invalid" pushed (3 values; the message names `who`
 * and `what`); a length running past limit is clamped to it, as io's
 * reads are short at the end of a file. Returns 1 with *out_* set. */
int ql_clamp_range(lua_State *L, const char *who, const char *what,
                   uint64_t offset, uint64_t length, uint64_t limit,
                   uint64_t *out_off, uint64_t *out_len);
/* A write-like range: [offset, offset + length) must lie inside limit
 * (a write that silently dropped bytes would lose data). Returns 1, or 0
 * with fail, message, "invalid" pushed. */
int ql_check_inside(lua_State *L, const char *who, const char *what,
                    uint64_t offset, uint64_t length, uint64_t limit);

/* Push a zeroed userdata of `size` bytes whose metatable `tname` (made
 * on first use) has __gc = gc: a box for C memory that must be freed
 * even when a Lua error jumps past the explicit release. */
void *ql_gc_box(lua_State *L, size_t size, const char *tname,
                lua_CFunction gc);

/* QEMU's size_to_str: "0 B", "64 MiB", "1.5 GiB" (3 significant digits). */
void ql_human_size(char *buf, size_t len, uint64_t bytes);
/* The file name part of a path (pointer into path). */
const char *ql_basename(const char *path);

/* A method table (name -> C function) of each type, kept in the registry
 * under these keys so qcow2.core can hand them to init.lua for extension. */
#define QL_METHODS_IMAGE    "qcow2.Image.methods"
#define QL_METHODS_SNAPSHOT "qcow2.Snapshot.methods"
#define QL_METHODS_MAP      "qcow2.ClusterMap.methods"

/* Create the metatable `tname` with __index = a function that looks up
 * the methods table (made from the NULL-terminated list of arrays
 * `methods`, stored in the registry under `methods_key`) first and then
 * calls `fields(L)` with (ud, key). Raises if a method name repeats. */
void ql_register_type(lua_State *L, const char *tname,
                      const char *methods_key,
                      const luaL_Reg *const methods[],
                      const luaL_Reg *metamethods, lua_CFunction fields);

#endif /* QCOW2_LUA_COMMON_H */
