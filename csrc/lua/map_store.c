/*
 * lua-qcow2 binding: a ClusterMap's extents kept compact. A big map of
 * scattered clusters has hundreds of thousands of extents; as an array of
 * qcow2_extent (64 bytes each) it weighed more than the L2 cache that
 * produced it. Here each extent is a few bytes of a byte stream:
 *
 *   header byte: type (bits 0-2, 7: a varint type follows), has_offset
 *                (3), reads_zero (4), a reason (5), an explicit start (6)
 *   [varint type] varint depth, varint length, [varint start],
 *   [zigzag varint: offset - end of the last extent with an offset],
 *   [varint compressed_size: compressed extents], [varint reason index]
 *
 * The start is implicit (the previous extent's end: the engine covers the
 * range in order) unless it is not. Every STORE_MARK extents a mark keeps
 * where a record starts and the decoder's state there, so m[i] decodes
 * at most STORE_MARK - 1 records before its own; a cursor kept in the
 * store makes in-order access one record each. Reasons (corrupt extents,
 * rare) are kept as strings beside the stream. Calls no Lua.
 */
#include <stdlib.h>
#include <string.h>

#include "common.h"

#define STORE_MARK 64u

enum {
    H_TYPE = 0x07, H_TYPE_ESCAPE = 0x07, H_OFFSET = 0x08, H_ZERO = 0x10,
    H_REASON = 0x20, H_START = 0x40
};

/* p (cap elements of size bytes) grown by doubling to hold need: the
 * new block, or NULL (p kept) when that cannot be had. */
static void *grow(void *p, size_t *cap, size_t need, size_t size)
{
    size_t n = *cap ? *cap : 64;

    if (need <= *cap)
        return p;
    while (n < need) {
        if (n > SIZE_MAX / 2 / size)
            return NULL;
        n *= 2;
    }
    p = realloc(p, n * size);
    if (p)
        *cap = n;
    return p;
}

static void put_varint(uint8_t *b, size_t *len, uint64_t v)
{
    while (v >= 0x80) {
        b[(*len)++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    b[(*len)++] = (uint8_t)v;
}

static uint64_t get_varint(const uint8_t *b, size_t *pos)
{
    uint64_t v = 0;

    for (unsigned shift = 0; shift < 64; shift += 7) {
        uint8_t c = b[(*pos)++];
        v |= (uint64_t)(c & 0x7f) << shift;
        if (!(c & 0x80))
            break;
    }
    return v;
}

static uint64_t zigzag(uint64_t d)
{
    return (d << 1) ^ (0 - (d >> 63));
}

static uint64_t unzigzag(uint64_t z)
{
    return (z >> 1) ^ (0 - (z & 1));
}

int ql_store_add(ql_extent_store *s, const qcow2_extent *e)
{
    /* header, type, depth, length, start, offset, csize, reason */
    uint8_t rec[1 + 7 * 10];
    size_t n = 1;
    unsigned type = e->type >= 0 && e->type < H_TYPE_ESCAPE
                  ? (unsigned)e->type : H_TYPE_ESCAPE;
    uint8_t h = (uint8_t)type, *bytes;

    if (s->count % STORE_MARK == 0) {
        ql_store_mark *marks = grow(s->marks, &s->marks_cap, s->nmarks + 1,
                                    sizeof *marks);
        if (!marks)
            return QCOW2_E_NOMEM;
        s->marks = marks;
        s->marks[s->nmarks].pos = s->len;
        s->marks[s->nmarks].start = s->next_start;
        s->marks[s->nmarks].off_base = s->off_base;
        s->nmarks++;
    }
    if (e->reason) {
        char **reasons = grow(s->reasons, &s->reasons_cap, s->nreasons + 1,
                              sizeof *reasons);
        if (!reasons)
            return QCOW2_E_NOMEM;
        s->reasons = reasons;
        if ((s->reasons[s->nreasons] = strdup(e->reason)) == NULL)
            return QCOW2_E_NOMEM;
        h |= H_REASON;
    }
    if (e->has_offset)
        h |= H_OFFSET;
    if (e->reads_zero)
        h |= H_ZERO;
    if (e->start != s->next_start)
        h |= H_START;
    if (type == H_TYPE_ESCAPE)
        put_varint(rec, &n, (uint64_t)(int64_t)e->type);
    put_varint(rec, &n, (uint64_t)(int64_t)e->depth);
    put_varint(rec, &n, e->length);
    if (h & H_START)
        put_varint(rec, &n, e->start);
    if (h & H_OFFSET) {
        put_varint(rec, &n, zigzag(e->offset - s->off_base));
        s->off_base = e->offset + e->length;
    }
    if (e->type == QCOW2_EXTENT_COMPRESSED)
        put_varint(rec, &n, e->compressed_size);
    if (h & H_REASON)
        put_varint(rec, &n, s->nreasons++);
    rec[0] = h;
    bytes = s->len + n < s->len ? NULL : grow(s->bytes, &s->cap, s->len + n, 1);
    if (!bytes) {
        if (h & H_REASON)
            free(s->reasons[--s->nreasons]);
        return QCOW2_E_NOMEM;
    }
    s->bytes = bytes;
    memcpy(s->bytes + s->len, rec, n);
    s->len += n;
    s->next_start = e->start + e->length;
    s->count++;
    return 0;
}

void ql_store_begin(const ql_extent_store *s, size_t index,
                    ql_store_cursor *c)
{
    size_t m = index / STORE_MARK;

    memset(c, 0, sizeof *c);
    if (m < s->nmarks) {
        c->index = m * STORE_MARK;
        c->pos = s->marks[m].pos;
        c->start = s->marks[m].start;
        c->off_base = s->marks[m].off_base;
    } else {
        c->index = s->count;
    }
}

int ql_store_next(const ql_extent_store *s, ql_store_cursor *c,
                  qcow2_extent *e)
{
    const uint8_t *b = s->bytes;
    size_t pos = c->pos;
    uint8_t h;

    if (c->index >= s->count)
        return 0;
    memset(e, 0, sizeof *e);
    h = b[pos++];
    e->type = (h & H_TYPE) == H_TYPE_ESCAPE ? (int)(int64_t)get_varint(b, &pos)
                                            : h & H_TYPE;
    e->depth = (int)(int64_t)get_varint(b, &pos);
    e->length = get_varint(b, &pos);
    e->start = h & H_START ? get_varint(b, &pos) : c->start;
    if (h & H_OFFSET) {
        e->has_offset = 1;
        e->offset = c->off_base + unzigzag(get_varint(b, &pos));
        c->off_base = e->offset + e->length;
    }
    if (e->type == QCOW2_EXTENT_COMPRESSED)
        e->compressed_size = get_varint(b, &pos);
    if (h & H_REASON)
        e->reason = s->reasons[get_varint(b, &pos)];
    e->reads_zero = (h & H_ZERO) != 0;
    c->pos = pos;
    c->start = e->start + e->length;
    c->index++;
    return 1;
}

int ql_store_get(ql_extent_store *s, size_t index, qcow2_extent *e)
{
    ql_store_cursor *c = &s->cursor;

    if (index >= s->count)
        return 0;
    /* in order from the cursor, else from the mark at or before index */
    if (!s->cursor_set || index < c->index ||
        index - c->index >= STORE_MARK) {
        ql_store_begin(s, index, c);
        s->cursor_set = 1;
    }
    while (c->index < index)
        ql_store_next(s, c, e);
    return ql_store_next(s, c, e);
}

void ql_store_free(ql_extent_store *s)
{
    for (size_t i = 0; i < s->nreasons; i++)
        free(s->reasons[i]);
    free(s->reasons);
    free(s->marks);
    free(s->bytes);
    memset(s, 0, sizeof *s);
}
