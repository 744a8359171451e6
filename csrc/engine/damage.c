/*
 * Damage a read-only open tolerates, as QEMU opens such images: a
 * refcount or snapshot table outside the file, over the header cluster or
 * over another table. The active disk does not need them, so the open
 * goes on; each problem is kept on the handle as the one-line message the
 * strict check left, for info() and check() to report.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

int qcow2_open_is_lenient(const qcow2_image *img)
{
    return img->open_for_repair || img->read_only;
}

void qcow2_note_damage(qcow2_image *img)
{
    size_t n = img->n_damage;
    int known = 0;

    /* a place checked twice (header, then the parsed snapshot table) is
     * noted once */
    for (size_t i = 0; i < n; i++)
        known |= strcmp(img->damage[i], img->err.msg) == 0;
    /* a bounded list: the open checks a handful of places */
    if (!known && n < sizeof img->damage / sizeof img->damage[0]) {
        img->damage[n] = strdup(img->err.msg);
        if (img->damage[n])
            img->n_damage = n + 1;
    }
    img->err.code = 0;
    img->err.msg[0] = '\0';
}

void qcow2_damage_free(qcow2_image *img)
{
    for (size_t i = 0; i < img->n_damage; i++)
        free(img->damage[i]);
    img->n_damage = 0;
}

size_t qcow2_open_damage_count(const qcow2_image *img)
{
    return img->n_damage;
}

const char *qcow2_open_damage(const qcow2_image *img, size_t index)
{
    return index < img->n_damage ? img->damage[index] : NULL;
}
