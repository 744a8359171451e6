/*
 * qemu-img check's shared state (check.h): the in-memory refcount table
 * ("IMRT" in QEMU), the buffers check reads into and the findings list.
 * The driver (check.c), the walk (check_walk.c), the reads (check_read.c)
 * and repair (repair.c) all call down to it; it calls none of them.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* ---- Findings ------------------------------------------------------------- */

/*
 * The findings array holds room for findings_room(finding_count) entries:
 * every writer (add_finding, append_findings) keeps that invariant, and
 * keep_repairs only shrinks the count, which keeps it too. Room is
 * therefore derived, never stored next to a count that could drift.
 */
static size_t findings_room(size_t count)
{
    size_t room = 8;

    while (room < count)
        room *= 2;
    return room;
}

/* Room for `count` findings in res (count <= CHECK_MAX_FINDINGS). */
static int findings_reserve(qcow2_check_result *res, size_t count)
{
    qcow2_finding *grown;

    if (res->findings && findings_room(count) <=
                             findings_room(res->finding_count))
        return 0;
    grown = realloc(res->findings, findings_room(count) * sizeof *grown);
    if (!grown)
        return QCOW2_E_NOMEM;
    res->findings = grown;
    return 0;
}

static void add_finding(check_state *st, int kind, uint64_t offset,
                        const char *fmt, va_list ap)
{
    qcow2_check_result *res = st->res;
    qcow2_finding *slot;
    char text[QCOW2_ERRMSG_MAX];

    if (res->finding_count >= CHECK_MAX_FINDINGS ||
        findings_reserve(res, res->finding_count + 1) < 0) {
        res->findings_dropped++;
        return;
    }
    vsnprintf(text, sizeof text, fmt, ap);
    slot = &res->findings[res->finding_count];
    slot->message = strdup(text);
    if (!slot->message) {
        res->findings_dropped++;
        return;
    }
    slot->kind = kind;
    slot->offset = offset;
    slot->cluster = offset >> st->img->cluster_bits;
    res->finding_count++;
}

void check_note(check_state *st, int kind, uint64_t offset, const char *fmt,
                ...)
{
    va_list ap;

    va_start(ap, fmt);
    add_finding(st, kind, offset, fmt, ap);
    va_end(ap);
}

void check_corrupt(check_state *st, uint64_t offset, const char *fmt, ...)
{
    va_list ap;

    st->res->corruptions++;
    va_start(ap, fmt);
    add_finding(st, QCOW2_FINDING_CORRUPTION, offset, fmt, ap);
    va_end(ap);
}

/* Findings move between results (the driver's passes); the room
 * invariant above holds. */
void check_append_findings(qcow2_check_result *to, qcow2_check_result *from)
{
    size_t take = from->finding_count;

    if (to->finding_count + take > CHECK_MAX_FINDINGS)
        take = CHECK_MAX_FINDINGS - to->finding_count;
    if (take && findings_reserve(to, to->finding_count + take) < 0)
        take = 0;
    if (take)
        memcpy(to->findings + to->finding_count, from->findings,
               take * sizeof *to->findings);
    for (size_t i = take; i < from->finding_count; i++)
        free(from->findings[i].message);
    to->finding_count += take;
    to->findings_dropped += from->findings_dropped +
                            (from->finding_count - take);
    free(from->findings);
    from->findings = NULL;
    from->finding_count = 0;
    from->findings_dropped = 0;
}

void check_keep_repairs(qcow2_check_result *res)
{
    size_t kept = 0;

    for (size_t i = 0; i < res->finding_count; i++) {
        if (res->findings[i].kind == QCOW2_FINDING_REPAIRED)
            res->findings[kept++] = res->findings[i];
        else
            free(res->findings[i].message);
    }
    res->finding_count = kept;
}

/* ---- In-memory refcounts ------------------------------------------------------ */

int check_inc(check_state *st, uint64_t offset, uint64_t size)
{
    qcow2_image *img = st->img;
    uint64_t end, first, last;

    if (size == 0)
        return 0;
    /* The last cluster of an image may be half written, so a reference
     * may run past the end of the file, but by less than one cluster. */
    if (add_overflows(offset, size, &end) ||
        end >= st->file_size + img->cluster_size) {
        check_corrupt(st, offset, "ERROR: counting reference for region "
                      "exceeding the end of the file by one cluster or "
                      "more: offset 0x%llx size 0x%llx", ull(offset),
                      ull(size));
        return 0;
    }
    first = offset >> img->cluster_bits;
    last = (end - 1) >> img->cluster_bits;
    for (uint64_t k = first; k <= last; k++) {
        if (k >= st->capacity)      /* cannot happen: bounded above */
            return QCOW2_E_NOMEM;
        if (k >= st->nb_clusters)
            st->nb_clusters = k + 1;
        if (st->counts[k] >= st->count_max) {
            check_corrupt(st, k << img->cluster_bits, "ERROR: overflow "
                          "cluster offset=0x%llx",
                          ull(k << img->cluster_bits));
            continue;
        }
        st->counts[k]++;
    }
    return 0;
}

/* ---- State ------------------------------------------------------------------------- */

int check_state_init(check_state *st, qcow2_image *img, int repair,
                     qcow2_check_result *res)
{
    uint64_t file_clusters;
    int ret;

    memset(st, 0, sizeof *st);
    st->img = img;
    st->res = res;
    st->repair = repair;
    st->has_data_file =
        (img->hdr.incompatible_features & INCOMPAT_DATA_FILE) != 0;
    st->count_max = min_u64(img->refcount_codec->max, UINT32_MAX);

    ret = img->io->ops->size(img->io, &st->file_size);
    if (ret < 0)
        return qcow2_fail(img, ret, "cannot get the size of the file");
    st->file_size = check_file_length(st->file_size);
    file_clusters = div_round_up(st->file_size, img->cluster_size);
    if (file_clusters > CHECK_MAX_CLUSTERS)
        return qcow2_fail(img, QCOW2_E_UNSUPPORTED, "the file holds %llu "
                          "clusters, more than qemu-img checks (%llu)",
                          ull(file_clusters), ull(CHECK_MAX_CLUSTERS));
    st->nb_clusters = file_clusters;
    st->capacity = file_clusters + 1;
    st->counts = calloc((size_t)st->capacity, sizeof *st->counts);
    st->refblock_slots = check_refblock_slots(img);
    st->refblock_shift = (uint32_t)__builtin_ctzll(img->refblock_entries);
    st->refblock_order = img->refcount_codec->order;
    st->refblocks = malloc((size_t)st->refblock_slots * img->cluster_size);
    st->refblock_tags = malloc(st->refblock_slots *
                               sizeof *st->refblock_tags);
    if (st->refblock_tags)  /* all-ones: UINT64_MAX, nothing held */
        memset(st->refblock_tags, 0xff,
               st->refblock_slots * sizeof *st->refblock_tags);
    if (!st->counts || !st->refblocks || !st->refblock_tags)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory for the "
                          "reference counts of %llu clusters",
                          ull(st->capacity));
    return 0;
}

static void state_free(check_state *st)
{
    free(st->counts);
    free(st->refblocks);
    free(st->refblock_tags);
    qcow2_check_result_free(&st->copied_aside);
    free(st->active_l1);
}

void check_state_release(check_state *st)
{
    state_free(st);
    memset(st, 0, sizeof *st);
}

void qcow2_check_result_free(qcow2_check_result *res)
{
    if (!res)
        return;
    for (size_t i = 0; i < res->finding_count; i++)
        free(res->findings[i].message);
    free(res->findings);
    res->findings = NULL;
    res->finding_count = 0;
}
