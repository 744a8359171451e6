/*
 * qemu-img check's reads (check.h): the image file as check reads it (no
 * cache of the engine filled or trusted; past the end of the file reads as
 * zeroes, as QEMU's block layer pads it), in few, large reads:
 *
 * - refcount blocks are kept in a bounded direct-mapped set (slot =
 *   reftable index modulo the slot count, one buffer), so that the COPIED
 *   check's lookups in host-offset order of the data do not read a block
 *   again for every cluster; a miss reads the run of following blocks that
 *   lie next to it in the file and in the set in the same read;
 * - L2 tables are read a window at a time (at most CHECK_RUN_BYTES), the
 *   window's tables sorted by host offset and every run of adjacent ones
 *   read at once, then handed out in L1 order.
 *
 * A run read that fails reports nothing: each table or block is read again
 * on its own when its turn comes, and that read reports the error, so the
 * findings and their order are those of one read per structure.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* ---- The file ----------------------------------------------------------------- */

/* Up to len bytes at offset, zeroes from st->file_size on. 0 or the
 * backend's negative status; no finding. */
static int pread_quiet(check_state *st, uint64_t offset, void *buf,
                       size_t len)
{
    qcow2_io *io = st->img->io;
    uint8_t *bytes = buf;
    size_t done = 0;

    while (done < len) {
        uint64_t at;
        int64_t got;
        if (add_overflows(offset, done, &at) || at >= st->file_size)
            break;
        got = io->ops->pread(io, bytes + done, len - done, at);
        if (got < 0)
            return (int)got;
        if (got == 0)
            break;
        done += (size_t)got;
    }
    memset(bytes + done, 0, len - done);
    return 0;
}

int check_pread(check_state *st, uint64_t offset, void *buf, size_t len,
                const char *what)
{
    qcow2_io *io = st->img->io;
    char text[128];
    int ret = pread_quiet(st, offset, buf, len);

    if (ret < 0) {
        st->res->check_errors++;
        check_note(st, QCOW2_FINDING_CHECK_ERROR, offset,
                   "ERROR: I/O error reading the %s at 0x%llx: %s", what,
                   ull(offset),
                   qcow2_errno_text(io->last_errno ? io->last_errno : EIO,
                                    text, sizeof text));
    }
    return ret;
}

/* ---- Refcount blocks -------------------------------------------------------------- */

void check_refblocks_forget(check_state *st)
{
    for (uint32_t s = 0; s < st->refblock_slots; s++)
        st->refblock_tags[s] = UINT64_MAX;
}

/* Block `index` (at block_offset, aligned) into its slot, with the blocks
 * after it that follow it in the file and in the set. Quiet: a failed
 * read reports nothing. */
static int refblock_load(check_state *st, uint64_t index,
                         uint64_t block_offset, int quiet)
{
    qcow2_image *img = st->img;
    uint32_t slot = (uint32_t)(index & (st->refblock_slots - 1));
    uint8_t *at = st->refblocks + (size_t)slot * img->cluster_size;
    uint32_t run = 1;
    uint64_t next;
    int ret;

    while (slot + run < st->refblock_slots &&
           index + run < img->reftable_entries &&
           st->refblock_tags[slot + run] != index + run &&
           !add_overflows(block_offset, (uint64_t)run * img->cluster_size,
                          &next) &&
           (img->reftable[index + run] & REFT_OFFSET_MASK) == next)
        run++;
    for (uint32_t k = 0; k < run; k++)
        st->refblock_tags[slot + k] = UINT64_MAX;
    if ((run > 1 || quiet) &&
        pread_quiet(st, block_offset, at, (size_t)run * img->cluster_size)
            == 0) {
        for (uint32_t k = 0; k < run; k++)
            st->refblock_tags[slot + k] = index + k;
        return 0;
    }
    if (quiet)
        return QCOW2_E_IO;
    ret = check_pread(st, block_offset, at, img->cluster_size,
                      "refcount block");
    if (ret < 0)
        return ret;
    st->refblock_tags[slot] = index;
    return 0;
}

int check_disk_refcount_load(check_state *st, uint64_t cluster,
                             uint64_t *refcount, int quiet)
{
    qcow2_image *img = st->img;
    uint64_t reftable_index = cluster >> st->refblock_shift;
    uint64_t block_offset;
    uint32_t slot;
    int ret;

    *refcount = 0;
    if (st->refcounts_dead)
        return QCOW2_E_IO;
    if (reftable_index >= img->reftable_entries)
        return 0;
    block_offset = img->reftable[reftable_index] & REFT_OFFSET_MASK;
    if (block_offset == 0)
        return 0;
    if (!is_aligned(block_offset, img->cluster_size)) {
        /* QEMU signals a fatal corruption here. Its check goes on reading
         * the other blocks (qcow2_get_refcount does not look at the dead
         * node), so only this block's reads fail; a repair cannot write
         * to the dead node, so there every later read fails too (a quiet
         * read leaves that to the loud one that comes in QEMU's order) */
        if (!quiet && st->repair)
            st->refcounts_dead = 1;
        return QCOW2_E_IO;
    }
    slot = (uint32_t)(reftable_index & (st->refblock_slots - 1));
    if (st->refblock_tags[slot] != reftable_index &&
        (ret = refblock_load(st, reftable_index, block_offset, quiet)) < 0)
        return ret;
    *refcount = img->refcount_codec->get(
        st->refblocks + (size_t)slot * img->cluster_size,
        cluster & (img->refblock_entries - 1));
    return 0;
}

/* ---- L2 tables ---------------------------------------------------------------------- */

typedef struct table_ref {
    uint64_t offset;
    uint32_t order;             /* its place among the window's tables */
} table_ref;

static int by_offset(const void *a, const void *b)
{
    const table_ref *x = a, *y = b;

    if (x->offset != y->offset)
        return x->offset < y->offset ? -1 : 1;
    return x->order < y->order ? -1 : x->order > y->order;
}

static int wanted(const check_tables *ct, uint32_t i)
{
    return ct->any_bits ? ct->l1[i] != 0
                        : (ct->l1[i] & L1E_OFFSET_MASK) != 0;
}

int check_tables_open(check_tables *ct, check_state *st, const uint64_t *l1,
                      uint32_t l1_size, int any_bits)
{
    uint64_t cluster_size = st->img->cluster_size;
    uint32_t count = 0, room;

    memset(ct, 0, sizeof *ct);
    ct->st = st;
    ct->l1 = l1;
    ct->l1_size = l1_size;
    ct->any_bits = any_bits;
    for (uint32_t i = 0; i < l1_size; i++)
        count += (uint32_t)wanted(ct, i);
    if (count == 0)
        return 0;
    room = cluster_size >= CHECK_RUN_BYTES
               ? 1 : (uint32_t)(CHECK_RUN_BYTES / cluster_size);
    ct->slots = count < room ? count : room;
    ct->buf = malloc((size_t)ct->slots * cluster_size);
    ct->refs = malloc((size_t)ct->slots * sizeof *ct->refs);
    ct->slot_of = malloc((size_t)ct->slots * sizeof *ct->slot_of);
    ct->loaded = malloc((size_t)ct->slots);
    ct->index_of = malloc((size_t)ct->slots * sizeof *ct->index_of);
    if (!ct->buf || !ct->refs || !ct->slot_of || !ct->loaded ||
        !ct->index_of) {
        check_tables_close(ct);
        return QCOW2_E_NOMEM;
    }
    return 0;
}

void check_tables_close(check_tables *ct)
{
    free(ct->buf);
    free(ct->refs);
    free(ct->slot_of);
    free(ct->loaded);
    free(ct->index_of);
    memset(ct, 0, sizeof *ct);
}

/* The window from L1 index `first` (wanted): up to ct->slots tables,
 * sorted by offset, each run of adjacent tables read at once. */
static void window_fill(check_tables *ct, uint32_t first)
{
    uint64_t cluster_size = ct->st->img->cluster_size;
    uint32_t n = 0, i;

    for (i = first; i < ct->l1_size && n < ct->slots; i++) {
        if (!wanted(ct, i))
            continue;
        ct->refs[n].offset = ct->l1[i] & L1E_OFFSET_MASK;
        ct->refs[n].order = n;
        ct->index_of[n++] = i;
    }
    ct->first = first;
    ct->end = i;
    ct->count = n;
    ct->next = 0;
    qsort(ct->refs, n, sizeof *ct->refs, by_offset);
    for (uint32_t k = 0; k < n;) {
        uint32_t run = 1;
        int ok;
        while (k + run < n && ct->refs[k + run].offset ==
                                  ct->refs[k].offset + run * cluster_size)
            run++;
        ok = pread_quiet(ct->st, ct->refs[k].offset,
                         ct->buf + (size_t)k * cluster_size,
                         (size_t)run * cluster_size) == 0;
        for (uint32_t j = k; j < k + run; j++) {
            ct->slot_of[ct->refs[j].order] = j;
            ct->loaded[j] = (uint8_t)ok;
        }
        k += run;
    }
}

int check_tables_get(check_tables *ct, uint32_t i, uint8_t **table)
{
    uint64_t cluster_size = ct->st->img->cluster_size;
    uint32_t slot;

    if (i >= ct->l1_size || !wanted(ct, i) || ct->slots == 0)
        return QCOW2_E_INVALID;     /* the caller's bug: nothing to read */
    /* tables the caller skipped are passed over */
    while (ct->next < ct->count && ct->index_of[ct->next] < i)
        ct->next++;
    if (i < ct->first || i >= ct->end || ct->next >= ct->count ||
        ct->index_of[ct->next] != i)
        window_fill(ct, i);
    slot = ct->slot_of[ct->next++];
    *table = ct->buf + (size_t)slot * cluster_size;
    if (!ct->loaded[slot] &&
        check_pread(ct->st, ct->l1[i] & L1E_OFFSET_MASK, *table,
                    cluster_size, "L2 table") < 0)
        return QCOW2_E_IO;
    return 0;
}
