/*
 * img:owners(): the claims of owners_walk.c swept into ranges that cover
 * the file once, in file order. Where no claim lies, the refcounts on
 * disk say leaked, free or unaccounted; where claims disagree the range
 * is an overlap naming two of them. Neighbouring pieces with the same
 * owner and the same readers merge (a run of data clusters at
 * consecutive guest offsets is one range). Compressed streams keep their
 * byte ranges: a stream's claim ends where the next stream begins (QEMU
 * packs streams byte by byte, and the entry's sector-rounded length may
 * run into the next one).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "owners.h"

/* Claims a piece remembers (for its label and detail); more are counted. */
#define OWN_SIG                 4
/* Problems listed on one range; more are counted. */
#define OWN_PROBLEMS_PER_RANGE  20

/* unaccounted ranges: why no refcount says anything */
enum { UNACC_PAST_TABLE, UNACC_NO_BLOCK, UNACC_BAD_BLOCK, UNACC_NO_TABLE };

static unsigned long long ull(uint64_t value)
{
    return (unsigned long long)value;
}

static const char *const owner_names[QCOW2_OWNER_KINDS] = {
    "header", "header_extension", "backing_name", "l1", "l2",
    "refcount_table", "refcount_block", "snapshot_table", "snapshot_l1",
    "snapshot_l2", "bitmap_directory", "bitmap_table", "bitmap_data",
    "crypto_header", "data", "compressed", "leaked", "free", "unaccounted",
    "overlap",
};

const char *qcow2_owner_name(int kind)
{
    return kind >= 0 && kind < QCOW2_OWNER_KINDS ? owner_names[kind] : NULL;
}

/* ---- Strings ----------------------------------------------------------------- */

typedef struct sbuf {
    char *s;
    size_t n, cap;
    int failed;
} sbuf;

static void sb_printf(sbuf *b, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void sb_printf(sbuf *b, const char *fmt, ...)
{
    va_list ap;
    int need;

    if (b->failed)
        return;
    va_start(ap, fmt);
    need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (need < 0) {
        b->failed = 1;
        return;
    }
    if (b->n + (size_t)need + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        char *grown;
        while (cap < b->n + (size_t)need + 1)
            cap *= 2;
        grown = realloc(b->s, cap);
        if (!grown) {
            b->failed = 1;
            return;
        }
        b->s = grown;
        b->cap = cap;
    }
    va_start(ap, fmt);
    vsnprintf(b->s + b->n, b->cap - b->n, fmt, ap);
    va_end(ap);
    b->n += (size_t)need;
}

/* The built string (NULL when empty), or -1 when memory ran out. */
static int sb_take(sbuf *b, char **out)
{
    *out = NULL;
    if (b->failed) {
        free(b->s);
        return QCOW2_E_NOMEM;
    }
    *out = b->s;
    return 0;
}

/* ---- Pieces and ranges ---------------------------------------------------------- */

typedef struct own_piece {
    uint64_t offset, length;
    int owner;
    unsigned flags;
    uint64_t refcount;          /* leaked: refcount; unaccounted: UNACC_* */
    size_t n;                   /* claims covering it */
    uint32_t claim[OWN_SIG];    /* the first of them, canonical order */
} own_piece;

typedef struct own_build {
    own_walk *w;
    qcow2_owner_range *out;
    size_t n_out, cap_out;
    own_piece rec;              /* the range being built */
    int has_rec;
    uint8_t *block;             /* one refcount block */
    uint64_t block_index;       /* its reftable index, or UINT64_MAX */
    int status;                 /* first failure */
} own_build;

static const own_claim *claim_at(const own_build *b, uint32_t i)
{
    return &b->w->claims[i];
}

static const own_source *source_of(const own_build *b, const own_claim *c)
{
    return &b->w->sources[c->ref];
}

/* l2 or snapshot_l2: the active L1 is walked first, so a table it
 * reaches lists view 0 first. */
static int claim_owner(const own_build *b, const own_claim *c)
{
    if (c->kind == QCOW2_OWNER_L2) {
        const own_source *s = source_of(b, c);
        return s->n_views && s->views[0] == 0 ? QCOW2_OWNER_L2
                                              : QCOW2_OWNER_SNAPSHOT_L2;
    }
    return c->kind;
}

static int views_equal(const own_source *a, const own_source *b)
{
    return a == b || (a->n_views == b->n_views &&
                      memcmp(a->views, b->views,
                             a->n_views * sizeof *a->views) == 0);
}

/* Two pieces side by side continue one range. */
static int mergeable(const own_build *b, const own_piece *r,
                     const own_piece *p)
{
    if (r->offset + r->length != p->offset || r->owner != p->owner ||
        r->flags != p->flags || r->refcount != p->refcount ||
        r->n != p->n || p->n > OWN_SIG)
        return 0;
    for (size_t i = 0; i < p->n; i++) {
        const own_claim *x = claim_at(b, r->claim[i]);
        const own_claim *y = claim_at(b, p->claim[i]);
        if (r->claim[i] == p->claim[i])
            continue;
        if (p->owner != QCOW2_OWNER_DATA || x->kind != QCOW2_OWNER_DATA ||
            y->kind != QCOW2_OWNER_DATA || x->shadow != y->shadow ||
            x->guest - x->offset != y->guest - y->offset ||
            !views_equal(source_of(b, x), source_of(b, y)))
            return 0;
    }
    return 1;
}

/* ---- Details ------------------------------------------------------------------------ */

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* The views reading the range (data: not through a shadowing entry),
 * one name per line, active first. */
static int views_text(own_build *b, const own_piece *r, char **out)
{
    qcow2_image *img = b->w->img;
    uint32_t *all;
    size_t total = 0, n = 0;
    sbuf s = { 0 };

    *out = NULL;
    for (size_t i = 0; i < r->n && i < OWN_SIG; i++) {
        const own_claim *c = claim_at(b, r->claim[i]);
        if (c->kind == QCOW2_OWNER_DATA || c->kind == QCOW2_OWNER_COMPRESSED ||
            c->kind == QCOW2_OWNER_L2)
            total += source_of(b, c)->n_views;
    }
    if (total == 0)
        return 0;
    all = malloc(total * sizeof *all);
    if (!all)
        return QCOW2_E_NOMEM;
    for (size_t i = 0; i < r->n && i < OWN_SIG; i++) {
        const own_claim *c = claim_at(b, r->claim[i]);
        const own_source *src;
        if ((c->kind != QCOW2_OWNER_DATA && c->kind != QCOW2_OWNER_COMPRESSED &&
             c->kind != QCOW2_OWNER_L2) ||
            (c->kind == QCOW2_OWNER_DATA && c->shadow &&
             !(r->flags & QCOW2_OWNER_SHADOW)))
            continue;
        src = source_of(b, c);
        if (src->n_views)
            memcpy(all + n, src->views, src->n_views * sizeof *all);
        n += src->n_views;
    }
    if (n)
        qsort(all, n, sizeof *all, cmp_u32);
    for (size_t i = 0; i < n; i++)
        if (i == 0 || all[i] != all[i - 1])
            sb_printf(&s, "%s%s", s.n ? "\n" : "",
                      owners_view_name(img, all[i]));
    free(all);
    return sb_take(&s, out);
}

/* A short name for one claim, for overlaps. */
static void claim_text(own_build *b, sbuf *s, const own_claim *c)
{
    qcow2_image *img = b->w->img;
    int owner = claim_owner(b, c);

    sb_printf(s, "%s", qcow2_owner_name(owner));
    switch (owner) {
    case QCOW2_OWNER_DATA:
    case QCOW2_OWNER_COMPRESSED:
        sb_printf(s, " (guest 0x%llx, %s)", ull(c->guest),
                  owners_view_name(img, source_of(b, c)->views[0]));
        break;
    case QCOW2_OWNER_L2:
    case QCOW2_OWNER_SNAPSHOT_L2:
        sb_printf(s, " (table at 0x%llx for guest 0x%llx)", ull(c->offset),
                  ull(c->guest));
        break;
    case QCOW2_OWNER_SNAPSHOT_L1:
        sb_printf(s, " (snapshot '%s')", owners_view_name(img, c->ref + 1));
        break;
    default:
        sb_printf(s, " (at 0x%llx)", ull(c->offset));
        break;
    }
}

static void detail_text(own_build *b, const own_piece *r, sbuf *s)
{
    qcow2_image *img = b->w->img;
    const own_claim *c = r->n ? claim_at(b, r->claim[0]) : NULL;
    uint64_t guest = c ? c->guest + (r->offset - c->offset) : 0;

    if (r->flags & QCOW2_OWNER_SLACK) {
        sb_printf(s, r->owner == QCOW2_OWNER_HEADER
                         ? "cluster 0 after the header, extensions and "
                           "backing name"
                         : r->owner == QCOW2_OWNER_COMPRESSED
                               ? "unused bytes of a cluster holding "
                                 "compressed streams"
                               : "unused rest of a cluster of this owner");
        return;
    }
    switch (r->owner) {
    case QCOW2_OWNER_HEADER:
        sb_printf(s, "qcow2 header, version %u, %u bytes", img->hdr.version,
                  img->hdr.header_length);
        break;
    case QCOW2_OWNER_HEADER_EXTENSION:
        sb_printf(s, "%zu header extensions and the end marker",
                  img->n_exts);
        break;
    case QCOW2_OWNER_BACKING_NAME:
        sb_printf(s, "backing file name \"%s\"",
                  img->backing_name ? img->backing_name : "");
        break;
    case QCOW2_OWNER_L1:
        sb_printf(s, "active L1 table, %u entries", img->hdr.l1_size);
        break;
    case QCOW2_OWNER_SNAPSHOT_L1:
        sb_printf(s, "L1 table of snapshot '%s', %u entries",
                  owners_view_name(img, c->ref + 1),
                  img->snapshots[c->ref].l1_size);
        break;
    case QCOW2_OWNER_L2:
    case QCOW2_OWNER_SNAPSHOT_L2:
        sb_printf(s, "L2 table for guest 0x%llx-0x%llx", ull(c->guest),
                  ull(c->guest + (img->l2_entries << img->cluster_bits) - 1));
        break;
    case QCOW2_OWNER_REFCOUNT_TABLE:
        sb_printf(s, "refcount table, %u clusters",
                  img->hdr.refcount_table_clusters);
        break;
    case QCOW2_OWNER_REFCOUNT_BLOCK:
        sb_printf(s, "refcount block %u: host clusters %llu-%llu", c->ref,
                  ull((uint64_t)c->ref * img->refblock_entries),
                  ull(((uint64_t)c->ref + 1) * img->refblock_entries - 1));
        break;
    case QCOW2_OWNER_SNAPSHOT_TABLE:
        sb_printf(s, "snapshot table, %u entries", img->nb_snapshots);
        break;
    case QCOW2_OWNER_BITMAP_DIRECTORY:
        sb_printf(s, "bitmap directory, %u bitmaps", img->ext.nb_bitmaps);
        break;
    case QCOW2_OWNER_BITMAP_TABLE:
    case QCOW2_OWNER_BITMAP_DATA:
        sb_printf(s, "%s of bitmap %u", r->owner == QCOW2_OWNER_BITMAP_TABLE
                                            ? "table" : "data", c->ref);
        break;
    case QCOW2_OWNER_CRYPTO_HEADER:
        sb_printf(s, "LUKS header");
        break;
    case QCOW2_OWNER_DATA:
        sb_printf(s, "guest 0x%llx-0x%llx%s", ull(guest),
                  ull(guest + r->length - 1),
                  r->flags & QCOW2_OWNER_SHADOW
                      ? ": behind zero-flagged or unallocated entries, no "
                        "view reads these bytes" : "");
        break;
    case QCOW2_OWNER_COMPRESSED:
        sb_printf(s, "compressed stream of guest 0x%llx-0x%llx",
                  ull(c->guest), ull(c->guest + img->cluster_size - 1));
        break;
    case QCOW2_OWNER_LEAKED:
        sb_printf(s, "refcount %llu, no reference", ull(r->refcount));
        break;
    case QCOW2_OWNER_FREE:
        sb_printf(s, "refcount 0");
        break;
    case QCOW2_OWNER_UNACCOUNTED:
        sb_printf(s, "%s", r->refcount == UNACC_NO_BLOCK
                               ? "its refcount table entry is empty"
                               : r->refcount == UNACC_BAD_BLOCK
                                     ? "its refcount block cannot be read"
                                     : r->refcount == UNACC_NO_TABLE
                                           ? "the refcount table cannot be "
                                             "read"
                                           : "past the clusters the "
                                             "refcount table covers");
        break;
    case QCOW2_OWNER_OVERLAP:
        sb_printf(s, "claimed by ");
        for (size_t i = 0; i < r->n && i < 2; i++) {
            if (i)
                sb_printf(s, " and by ");
            claim_text(b, s, claim_at(b, r->claim[i]));
        }
        if (r->n > 2)
            sb_printf(s, " and %zu more", r->n - 2);
        break;
    default:
        break;
    }
    if (r->owner == QCOW2_OWNER_DATA && r->n > 1)
        sb_printf(s, " (%zu references)", r->n);
}

/* Close the range being built: it becomes the next output range. */
static void finish_range(own_build *b)
{
    const own_piece *r = &b->rec;
    qcow2_owner_range *o;
    sbuf s = { 0 };

    if (!b->has_rec || b->status < 0)
        return;
    b->has_rec = 0;
    if (b->n_out == b->cap_out) {
        size_t cap = b->cap_out ? b->cap_out * 2 : 64;
        qcow2_owner_range *grown = realloc(b->out, cap * sizeof *grown);
        if (!grown) {
            b->status = QCOW2_E_NOMEM;
            return;
        }
        b->out = grown;
        b->cap_out = cap;
    }
    o = &b->out[b->n_out++];
    memset(o, 0, sizeof *o);
    o->offset = r->offset;
    o->length = r->length;
    o->owner = r->owner;
    o->flags = r->flags;
    if (r->owner == QCOW2_OWNER_LEAKED)
        o->refcount = r->refcount;
    if ((r->owner == QCOW2_OWNER_DATA || r->owner == QCOW2_OWNER_COMPRESSED) &&
        !(r->flags & QCOW2_OWNER_SLACK) && r->n) {
        const own_claim *c = claim_at(b, r->claim[0]);
        o->has_guest = 1;
        o->guest_offset = r->owner == QCOW2_OWNER_DATA
                              ? c->guest + (r->offset - c->offset) : c->guest;
    }
    detail_text(b, r, &s);
    if (sb_take(&s, &o->detail) < 0 ||
        (!(r->flags & QCOW2_OWNER_SLACK) && views_text(b, r, &o->views) < 0))
        b->status = QCOW2_E_NOMEM;
}

static void emit(own_build *b, const own_piece *p)
{
    if (p->length == 0)
        return;
    if (b->has_rec && mergeable(b, &b->rec, p)) {
        b->rec.length += p->length;
        return;
    }
    finish_range(b);
    b->rec = *p;
    b->has_rec = 1;
}

/* ---- Claimed pieces ----------------------------------------------------------------- */

/* Canonical order of the claims of a piece: by first reader, shadow,
 * then claim index, so that two pieces of one range compare pairwise. */
static int claim_before(const own_build *b, uint32_t x, uint32_t y)
{
    const own_claim *a = claim_at(b, x), *c = claim_at(b, y);
    int has_a = a->kind == QCOW2_OWNER_DATA || a->kind == QCOW2_OWNER_L2 ||
                a->kind == QCOW2_OWNER_COMPRESSED;
    int has_c = c->kind == QCOW2_OWNER_DATA || c->kind == QCOW2_OWNER_L2 ||
                c->kind == QCOW2_OWNER_COMPRESSED;
    uint32_t va = has_a && source_of(b, a)->n_views
                      ? source_of(b, a)->views[0] : UINT32_MAX;
    uint32_t vc = has_c && source_of(b, c)->n_views
                      ? source_of(b, c)->views[0] : UINT32_MAX;

    if (va != vc)
        return va < vc;
    if (a->shadow != c->shadow)
        return a->shadow < c->shadow;
    return x < y;
}

static void emit_claimed(own_build *b, uint64_t from, uint64_t to,
                         const uint32_t *act, size_t n_act)
{
    own_piece p = { from, to - from, 0, 0, 0, n_act, { 0 } };
    const own_claim *first;
    int all_data = 1, all_shadow = 1, same = 1;

    /* the OWN_SIG first claims in canonical order (insertion) */
    for (size_t i = 0, m = 0; i < n_act; i++) {
        size_t j;
        if (m == OWN_SIG) {
            if (!claim_before(b, act[i], p.claim[OWN_SIG - 1]))
                continue;
            m--;
        }
        for (j = m++; j > 0 && claim_before(b, act[i], p.claim[j - 1]); j--)
            p.claim[j] = p.claim[j - 1];
        p.claim[j] = act[i];
    }
    first = claim_at(b, p.claim[0]);
    for (size_t i = 0; i < n_act; i++) {
        const own_claim *c = claim_at(b, act[i]);
        if (c->kind != first->kind)
            same = 0;
        if (c->kind != QCOW2_OWNER_DATA)
            all_data = 0;
        else if (!c->shadow)
            all_shadow = 0;
        if (c->guest - c->offset != first->guest - first->offset ||
            (c->kind == QCOW2_OWNER_COMPRESSED && c->offset != first->offset))
            same = 0;
    }
    if (n_act == 1) {
        p.owner = claim_owner(b, first);
        if (first->kind == QCOW2_OWNER_DATA && first->shadow)
            p.flags = QCOW2_OWNER_SHADOW;
    } else if (same && (all_data || first->kind == QCOW2_OWNER_COMPRESSED)) {
        /* one guest range shared by several views (their own tables) */
        p.owner = first->kind;
        if (all_data && all_shadow)
            p.flags = QCOW2_OWNER_SHADOW;
    } else {
        p.owner = QCOW2_OWNER_OVERLAP;
    }
    emit(b, &p);
}

/* ---- Unclaimed pieces: the refcounts say ----------------------------------------------- */

static void refcount_state(own_build *b, uint64_t cluster, own_piece *p)
{
    own_walk *w = b->w;
    qcow2_image *img = w->img;
    uint64_t index = cluster / img->refblock_entries, block;
    size_t done;

    p->owner = QCOW2_OWNER_UNACCOUNTED;
    if (!w->reftable) {
        p->refcount = UNACC_NO_TABLE;
        return;
    }
    if (index >= w->reftable_entries) {
        p->refcount = UNACC_PAST_TABLE;
        return;
    }
    block = w->reftable[index];
    if (block == 0 || block == UINT64_MAX) {
        p->refcount = block ? UNACC_BAD_BLOCK : UNACC_NO_BLOCK;
        return;
    }
    if (b->block_index != index) {
        b->block_index = UINT64_MAX;
        if (qcow2_pread_zero_fill(img->io, block, b->block,
                                  img->cluster_size, &done) < 0) {
            p->refcount = UNACC_BAD_BLOCK;
            return;
        }
        b->block_index = index;
    }
    p->refcount = img->refcount_codec->get(b->block,
                                           cluster % img->refblock_entries);
    if (p->refcount) {
        p->owner = QCOW2_OWNER_LEAKED;
    } else {
        p->owner = QCOW2_OWNER_FREE;
    }
}

/* [from, to) no claim covers. In a cluster that a claim shares, the
 * bytes are the slack of that claim's owner (of the header in cluster
 * 0); whole clusters go by their refcount. right: the owner of the claim
 * starting at `to`, or -1. */
static void emit_unclaimed(own_build *b, uint64_t from, uint64_t to,
                           int right)
{
    uint64_t cs = b->w->img->cluster_size;
    uint64_t pos = from;

    while (pos < to && b->status == 0) {
        uint64_t end = min_u64(to, (pos / cs + 1) * cs);
        own_piece p = { pos, end - pos, 0, 0, 0, 0, { 0 } };

        if (pos < cs) {
            p.owner = QCOW2_OWNER_HEADER;
            p.flags = QCOW2_OWNER_SLACK;
        } else if (!is_aligned(pos, cs) && b->has_rec) {
            p.owner = b->rec.owner;
            p.flags = QCOW2_OWNER_SLACK;
        } else if (end == to && !is_aligned(end, cs) && right >= 0) {
            p.owner = right;
            p.flags = QCOW2_OWNER_SLACK;
        } else {
            refcount_state(b, pos / cs, &p);
        }
        if (p.owner == QCOW2_OWNER_FREE || p.owner == QCOW2_OWNER_UNACCOUNTED)
            p.refcount = p.owner == QCOW2_OWNER_FREE ? 0 : p.refcount;
        if (p.flags & QCOW2_OWNER_SLACK)
            p.refcount = 0;
        emit(b, &p);
        pos = end;
    }
}

/* ---- The sweep ----------------------------------------------------------------------- */

static int cmp_claim(const void *a, const void *b)
{
    const own_claim *x = a, *y = b;
    if (x->offset != y->offset)
        return (x->offset > y->offset) - (x->offset < y->offset);
    return (x->length > y->length) - (x->length < y->length);
}

/* A compressed claim ends where the next stream starts (claims sorted;
 * streams at one offset, from several tables, stay whole). */
static void cut_compressed(own_walk *w)
{
    uint64_t next = UINT64_MAX, group = UINT64_MAX;

    for (size_t i = w->n_claims; i-- > 0;) {
        own_claim *c = &w->claims[i];
        if (c->kind != QCOW2_OWNER_COMPRESSED)
            continue;
        if (c->offset != group) {
            next = group;
            group = c->offset;
        }
        if (next != UINT64_MAX && c->offset + c->length > next)
            c->length = next - c->offset;
    }
}

static int sweep(own_build *b)
{
    own_walk *w = b->w;
    uint32_t *act = NULL;
    size_t n_act = 0, cap_act = 0, k = 0;
    uint64_t pos = 0;

    while (pos < w->file_size && b->status == 0) {
        uint64_t next = w->file_size;
        size_t kept = 0;

        for (size_t i = 0; i < n_act; i++) {
            const own_claim *c = &w->claims[act[i]];
            if (c->offset + c->length > pos)
                act[kept++] = act[i];
        }
        n_act = kept;
        for (; k < w->n_claims && w->claims[k].offset <= pos; k++) {
            const own_claim *c = &w->claims[k];
            if (c->offset + c->length <= pos)
                continue;
            if (n_act == cap_act) {
                size_t cap = cap_act ? cap_act * 2 : 16;
                uint32_t *grown = realloc(act, cap * sizeof *grown);
                if (!grown) {
                    free(act);
                    return QCOW2_E_NOMEM;
                }
                act = grown;
                cap_act = cap;
            }
            act[n_act++] = (uint32_t)k;
        }
        if (k < w->n_claims)
            next = min_u64(next, w->claims[k].offset);
        for (size_t i = 0; i < n_act; i++)
            next = min_u64(next, w->claims[act[i]].offset +
                                     w->claims[act[i]].length);
        if (n_act)
            emit_claimed(b, pos, next, act, n_act);
        else
            emit_unclaimed(b, pos, next,
                           k < w->n_claims && w->claims[k].offset == next
                               ? claim_owner(b, &w->claims[k]) : -1);
        pos = next;
    }
    free(act);
    finish_range(b);
    return b->status;
}

/* ---- Problems onto ranges ------------------------------------------------------------- */

static int cmp_problem(const void *a, const void *b)
{
    const own_problem *x = a, *y = b;
    return (x->at > y->at) - (x->at < y->at);
}

static int attach_problems(own_build *b)
{
    own_walk *w = b->w;
    size_t p = 0;

    if (w->n_problems)
        qsort(w->problems, w->n_problems, sizeof *w->problems,
              cmp_problem);
    for (size_t r = 0; r < b->n_out; r++) {
        qcow2_owner_range *o = &b->out[r];
        int last = r + 1 == b->n_out;
        size_t listed = 0, more = 0;
        sbuf s = { 0 };

        for (; p < w->n_problems &&
               (last || w->problems[p].at < o->offset + o->length); p++) {
            if (listed++ < OWN_PROBLEMS_PER_RANGE)
                sb_printf(&s, "%s%s", s.n ? "\n" : "", w->problems[p].text);
            else
                more++;
        }
        if (last && w->problems_dropped)
            more += w->problems_dropped;
        if (more)
            sb_printf(&s, "%s%zu more problems", s.n ? "\n" : "", more);
        if (sb_take(&s, &o->problems) < 0)
            return QCOW2_E_NOMEM;
    }
    return 0;
}

/* ---- Entry points ----------------------------------------------------------------------- */

void qcow2_owners_free(qcow2_owner_range *ranges, size_t count)
{
    if (!ranges)
        return;
    for (size_t i = 0; i < count; i++) {
        free(ranges[i].detail);
        free(ranges[i].views);
        free(ranges[i].problems);
    }
    free(ranges);
}

/* A raw image: every byte is guest data at the same offset. */
static int raw_owners(uint64_t size, qcow2_owner_range **out, size_t *count)
{
    qcow2_owner_range *r;

    if (size == 0)
        return 0;
    r = calloc(1, sizeof *r);
    if (!r || !(r->views = strdup("active")) ||
        !(r->detail = strdup("raw image: guest data"))) {
        qcow2_owners_free(r, 1);
        return QCOW2_E_NOMEM;
    }
    r->length = size;
    r->owner = QCOW2_OWNER_DATA;
    r->has_guest = 1;
    *out = r;
    *count = 1;
    return 0;
}

static int owners_work(qcow2_image *img, qcow2_owner_range **out, size_t *count)
{
    own_walk w = { 0 };
    own_build b = { 0 };
    uint64_t size;
    int ret;

    *out = NULL;
    *count = 0;
    if (img->is_snapshot_view)
        return qcow2_fail(img, QCOW2_E_INVALID, "owners of a snapshot view: "
                          "ask the image it belongs to (the same file)");
    /* a read-write handle: the file must say what the handle knows */
    if (!img->read_only && (ret = qcow2_flush(img)) < 0)
        return ret;
    if ((ret = img->io->ops->size(img->io, &size)) < 0)
        return qcow2_fail(img, ret, "cannot get the size of the file");
    if (img->is_raw)
        return raw_owners(size, out, count) < 0
                   ? qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for owners")
                   : 0;
    w.img = img;
    w.file_size = size;
    b.w = &w;
    b.block_index = UINT64_MAX;
    b.block = malloc((size_t)img->cluster_size);
    ret = b.block ? owners_walk(&w) : QCOW2_E_NOMEM;
    if (ret == 0) {
        if (w.n_claims)
            qsort(w.claims, w.n_claims, sizeof *w.claims, cmp_claim);
        cut_compressed(&w);
        ret = sweep(&b);
    }
    if (ret == 0)
        ret = attach_problems(&b);
    free(b.block);
    owners_walk_free(&w);
    if (ret < 0) {
        qcow2_owners_free(b.out, b.n_out);
        if (ret == QCOW2_E_NOMEM)
            return qcow2_fail(img, ret, "out of memory for owners");
        return ret;     /* message set where it failed */
    }
    *out = b.out;
    *count = b.n_out;
    return 0;
}

/* Reads behind the caches: dirty tables written first. */
int qcow2_owners(qcow2_image *img, qcow2_owner_range **out, size_t *count)
{
    int rc = qcow2_meta_flush(img);

    return rc < 0 ? rc : owners_work(img, out, count);
}
