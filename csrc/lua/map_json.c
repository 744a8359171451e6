/*
 * lua-qcow2 binding: a ClusterMap's extents as the JSON `qemu-img map
 * --output=json` prints, written in C straight from the extent array.
 *
 * The same records as MapMethods:records() in lua/qcow2/init.lua (flags
 * per type, adjacent records merged as qemu-img merges them) in
 * qemu-img's own layout (qemu-img.c dump_map_entry), so that a big map
 * costs one growing buffer or a file written in pieces, never a Lua
 * table per extent (the extents decoded one at a time from the map's
 * compact store, map_store.c).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* Written to a file once this much text is pending. */
#define JSON_PIECE ((size_t)64 << 10)

typedef struct record {
    uint64_t start, length, offset;
    int depth, present, zero, data, has_offset, corrupt;
    const char *reason;
} record;

typedef struct json_out {
    char **buf;                 /* the caller's: a sink that raises leaves
                                   it there for the caller to free */
    size_t len, cap;
    FILE *file;
    ql_json_sink sink;
    void *ctx;
} json_out;

static int reserve(json_out *o, size_t more)
{
    size_t cap = o->cap ? o->cap : 4096;
    char *grown;

    if (more > SIZE_MAX - o->len)
        return QCOW2_E_NOMEM;
    if (o->len + more <= o->cap)
        return 0;
    while (cap < o->len + more) {
        if (cap > SIZE_MAX / 2)
            return QCOW2_E_NOMEM;
        cap *= 2;
    }
    grown = realloc(*o->buf, cap);
    if (!grown)
        return QCOW2_E_NOMEM;
    *o->buf = grown;
    o->cap = cap;
    return 0;
}

static int drain(json_out *o)
{
    if (o->len == 0 || (!o->file && !o->sink))
        return 0;
    if (o->sink) {
        int rc = o->sink(o->ctx, *o->buf, o->len);
        o->len = 0;
        return rc;
    }
    if (fwrite(*o->buf, 1, o->len, o->file) != o->len) {
        if (errno == 0)
            errno = EIO;
        return QCOW2_E_IO;
    }
    o->len = 0;
    return 0;
}

static int put(json_out *o, const char *text, size_t n)
{
    int rc = reserve(o, n);

    if (rc == 0) {
        memcpy(*o->buf + o->len, text, n);
        o->len += n;
    }
    return rc;
}

/* A JSON string: quotes, backslashes and control bytes escaped. */
static int put_string(json_out *o, const char *s)
{
    int rc = put(o, "\"", 1);

    for (; rc == 0 && *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            rc = put(o, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            rc = put(o, esc, 6);
        } else {
            rc = put(o, s, 1);
        }
    }
    return rc == 0 ? put(o, "\"", 1) : rc;
}

static const char *flag(int v)
{
    return v ? "true" : "false";
}

static int put_record(json_out *o, const record *r, int first)
{
    char line[256];
    int n = snprintf(line, sizeof line,
                     "%s{ \"start\": %" PRIu64 ", \"length\": %" PRIu64
                     ", \"depth\": %d, \"present\": %s, \"zero\": %s,"
                     " \"data\": %s", first ? "" : ",\n", r->start,
                     r->length, r->depth, flag(r->present), flag(r->zero),
                     flag(r->data));
    int rc = put(o, line, (size_t)n);

    if (rc == 0 && r->has_offset) {
        n = snprintf(line, sizeof line, ", \"offset\": %" PRIu64, r->offset);
        rc = put(o, line, (size_t)n);
    }
    if (rc == 0 && r->corrupt) {
        {
            static const char key[] = ", \"corrupt\": true, \"reason\": ";
            rc = put(o, key, sizeof key - 1);
        }
        if (rc == 0)
            rc = put_string(o, r->reason ? r->reason : "");
    }
    if (rc == 0)
        rc = put(o, "}", 1);
    if (rc == 0 && o->len >= JSON_PIECE)
        rc = drain(o);
    return rc;
}

/* The flags qemu-img prints for an extent (records() in init.lua). */
static record to_record(const qcow2_extent *e)
{
    record r = { .start = e->start, .length = e->length, .depth = e->depth,
                 .offset = e->offset };

    switch (e->type) {
    case QCOW2_EXTENT_DATA:
        /* a hole QEMU guesses metadata-preallocated: data and zero */
        r.present = r.data = 1;
        r.zero = e->reads_zero != 0;
        r.has_offset = e->has_offset;
        break;
    case QCOW2_EXTENT_COMPRESSED:
        /* qemu-img 7.2 never prints a host offset for compressed data */
        r.present = r.data = 1;
        break;
    case QCOW2_EXTENT_ZERO:
        r.present = r.zero = 1;
        r.has_offset = e->has_offset;
        break;
    case QCOW2_EXTENT_CORRUPT:
        r.corrupt = 1;
        r.reason = e->reason;
        break;
    default:
        /* the empty record of a 0-byte disk has no flag set */
        r.zero = e->length > 0;
        r.has_offset = e->has_offset;
        break;
    }
    return r;
}

/* qemu-img's merge: same flags and depth, guest ranges adjacent, host
 * offsets contiguous or both absent; corrupt records never merge. */
static int merges(const record *last, const record *r)
{
    if (last->corrupt || r->corrupt || last->depth != r->depth ||
        last->present != r->present || last->zero != r->zero ||
        last->data != r->data || last->start + last->length != r->start ||
        last->has_offset != r->has_offset)
        return 0;
    return !r->has_offset || last->offset + last->length == r->offset;
}

int ql_map_json(const ql_extent_store *store, FILE *file, ql_json_sink sink,
                void *ctx, char **out, size_t *out_len)
{
    json_out o = { out, 0, 0, file, sink, ctx };
    ql_store_cursor c;
    qcow2_extent e;
    record last;
    int rc = put(&o, "[", 1), have = 0, first = 1;

    ql_store_begin(store, 0, &c);
    while (rc == 0 && ql_store_next(store, &c, &e)) {
        record r = to_record(&e);
        if (have && merges(&last, &r)) {
            last.length += r.length;
            continue;
        }
        if (have) {
            rc = put_record(&o, &last, first);
            first = 0;
        }
        last = r;
        have = 1;
    }
    if (rc == 0 && have)
        rc = put_record(&o, &last, first);
    if (rc == 0)
        rc = put(&o, "]", 1);
    if (rc == 0)
        rc = drain(&o);
    if (rc == 0 && file && fflush(file) != 0)
        rc = QCOW2_E_IO;
    if (rc != 0 || file || sink) {
        free(*out);
        *out = NULL;
        o.len = 0;
    }
    *out_len = o.len;
    return rc;
}
