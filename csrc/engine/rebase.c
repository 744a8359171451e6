/*
 * Safe rebase's copy-in (QEMU 7.2's img_rebase): before the backing name
 * changes, every sector the image does not allocate itself and whose
 * bytes through the current chain differ from the new chain's is written
 * into the image with the current chain's bytes. Those are ordinary guest
 * writes of the bytes the guest already reads, so a crash at any point
 * leaves an image reading the same; the switch (amend.c) comes after a
 * flush. chain.c opens the new backing and switches.
 *
 * The image's own lookups are walked (not the chain's map: no file holes
 * are probed); each run of ranges it does not allocate is handled as soon
 * as it ends: the parts the two chains' maps cannot prove equal
 * (diff.c) are compared chunk by chunk. The
 * writes only touch ranges already walked. The new chain's chunk is read
 * on a helper thread while the calling thread reads the current chain's:
 * the new backing is a handle of its own (caches, error buffer) that
 * only the helper touches between a request and its answer. Memory: two
 * chunks.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "chain_ops.h"

#define CHUNK   ((size_t)1 << 20)       /* compared at a time */
#define SECTOR  512u

/* The new chain's reads, on a helper thread when one could be started. */
typedef struct new_reader {
    qcow2_image *nb;            /* NULL: zeroes */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int running;                /* the helper exists */
    int pending, stop;          /* under mu */
    uint64_t at;
    uint8_t *buf;
    size_t n;
    int rc;                     /* the last read's, nb's error behind it */
} new_reader;

/* The new chain's bytes: zeroes without one or past its end. Only nb's
 * error buffer is written (this may run on the helper). */
static int read_new_bytes(qcow2_image *nb, uint64_t at, uint8_t *buf,
                          size_t n)
{
    size_t have = 0;
    int rc = 0;

    if (nb && at < nb->size)
        have = (size_t)(nb->size - at < n ? nb->size - at : n);
    if (have)
        rc = qcow2_read(nb, at, buf, have);
    memset(buf + have, 0, n - have);
    return rc < 0 ? rc : 0;
}

static void *reader_main(void *arg)
{
    new_reader *r = arg;

    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->pending && !r->stop)
            pthread_cond_wait(&r->cv, &r->mu);
        if (!r->pending)
            break;
        pthread_mutex_unlock(&r->mu);
        int rc = read_new_bytes(r->nb, r->at, r->buf, r->n);
        pthread_mutex_lock(&r->mu);
        r->rc = rc;
        r->pending = 0;
        pthread_cond_broadcast(&r->cv);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

/* Without a new backing there is nothing to read: no helper. A helper
 * that cannot be started means reads on the calling thread. */
static void reader_start(new_reader *r, qcow2_image *nb)
{
    memset(r, 0, sizeof *r);
    r->nb = nb;
    if (!nb || pthread_mutex_init(&r->mu, NULL) != 0)
        return;
    if (pthread_cond_init(&r->cv, NULL) != 0) {
        pthread_mutex_destroy(&r->mu);
        return;
    }
    r->running = pthread_create(&r->thread, NULL, reader_main, r) == 0;
    if (!r->running) {
        pthread_cond_destroy(&r->cv);
        pthread_mutex_destroy(&r->mu);
    }
}

static void reader_stop(new_reader *r)
{
    if (!r->running)
        return;
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    pthread_cond_destroy(&r->cv);
    pthread_mutex_destroy(&r->mu);
}

/* Start reading the new chain's n bytes at at into buf. */
static void reader_post(new_reader *r, uint64_t at, uint8_t *buf, size_t n)
{
    if (!r->running) {
        r->rc = read_new_bytes(r->nb, at, buf, n);
        return;
    }
    pthread_mutex_lock(&r->mu);
    r->at = at;
    r->buf = buf;
    r->n = n;
    r->pending = 1;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

/* The posted read's result, its failure named on img. */
static int reader_wait(qcow2_image *img, new_reader *r)
{
    if (r->running) {
        pthread_mutex_lock(&r->mu);
        while (r->pending)
            pthread_cond_wait(&r->cv, &r->mu);
        pthread_mutex_unlock(&r->mu);
    }
    if (r->rc < 0)
        return qcow2_fail(img, r->rc, "new backing file: %s",
                          qcow2_errmsg(r->nb));
    return 0;
}

/* Bytes from guest offset at to the next guest sector boundary, at most
 * left: differences are found per sector, as qemu-img compares. */
static size_t unit(uint64_t at, size_t left)
{
    size_t u = SECTOR - (size_t)(at % SECTOR);
    return u < left ? u : left;
}

/* One range the image does not hold: the current chain's bytes written
 * over every run of differing sectors. */
static int copy_range(qcow2_image *img, new_reader *nr, uint64_t start,
                      uint64_t length, uint8_t *old, uint8_t *neu)
{
    uint64_t end = start + length;
    int rc = 0;

    for (uint64_t at = start; rc == 0 && at < end;) {
        size_t n = (size_t)(end - at < CHUNK ? end - at : CHUNK);
        reader_post(nr, at, neu, n);
        rc = qcow2_read(img, at, old, n);
        int rc_new = reader_wait(img, nr);   /* always waited for */
        if (rc == 0)
            rc = rc_new;
        for (size_t i = 0; rc == 0 && i < n;) {
            size_t u = unit(at + i, n - i), j;
            if (memcmp(old + i, neu + i, u) == 0) {
                i += u;
                continue;
            }
            for (j = i + u; j < n; j += u) {
                u = unit(at + j, n - j);
                if (memcmp(old + j, neu + j, u) == 0)
                    break;
            }
            rc = qcow2_write(img, at + i, old + i, j - i);
            i = j;
        }
        at += n;
    }
    return rc;
}

/* What copy_range needs, for qcow2_diff_unproven's callback. */
typedef struct copy_ctx {
    qcow2_image *img;
    new_reader *nr;
    uint8_t *old, *neu;
    int failed;                 /* copy_range's failure: on img already */
} copy_ctx;

static int copy_unproven(void *ctx, uint64_t start, uint64_t length)
{
    copy_ctx *cc = ctx;
    int rc = copy_range(cc->img, cc->nr, start, length, cc->old, cc->neu);

    cc->failed = rc < 0;
    return rc;
}

/* One range the image does not hold. With both chains there, only what
 * their maps cannot prove equal is read (both sides reading the same
 * host bytes of one file, or zeroes, are equal: a new backing that is
 * the old one's own backing file is read only where the old one holds
 * data of its own). */
static int unowned_range(copy_ctx *cc, qcow2_image *nb, uint64_t from,
                         uint64_t to)
{
    qcow2_image *img = cc->img, *old = img->backing;
    int rc;

    if (!old || !nb)
        return copy_range(img, cc->nr, from, to - from, cc->old, cc->neu);
    rc = qcow2_diff_unproven(old, nb, from, to - from, copy_unproven, cc);
    if (rc < 0 && !cc->failed)
        rc = qcow2_fail(img, rc, "comparing the old and new backing "
                        "chains: %s", qcow2_errmsg(old));
    return rc;
}

int qcow2_rebase_copy(qcow2_image *img, qcow2_image *new_backing)
{
    uint8_t *old = malloc(CHUNK), *neu = malloc(CHUNK);
    uint64_t from = 0, to = 0;      /* unowned range being extended */
    new_reader nr;
    copy_ctx cc = { img, &nr, old, neu, 0 };
    qcow2_run run;
    int rc = old && neu ? 0 : qcow2_fail(img, QCOW2_E_NOMEM,
                                         "out of memory");

    reader_start(&nr, new_backing);
    for (uint64_t g = 0; rc == 0 && g < img->size; g += run.length) {
        rc = qcow2_lookup_run(img, g, img->size - g, &run);
        if (rc < 0)
            break;
        if (sc_type_is_unallocated(run.type)) {
            if (to != g)
                from = g;
            to = g + run.length;
            if (to < img->size)
                continue;
        }
        if (to > from)
            rc = unowned_range(&cc, new_backing, from, to);
        from = to;
    }
    reader_stop(&nr);
    if (rc == 0)
        rc = qcow2_flush(img);
    free(old);
    free(neu);
    return rc;
}
