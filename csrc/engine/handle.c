/*
 * A handle's memory and files released (layer 5), nothing flushed and no
 * backing image closed: what qcow2_close does after the write state is
 * closed, and all a snapshot view (which owns neither) needs.
 */
#include <stdlib.h>

#include "crypto.h"
#include "read_path.h"

void qcow2_handle_free(qcow2_image *img)
{
    if (!img)
        return;
    if (img->l2_cache)
        qcow2_l2_cache_free(img->l2_cache);
    qcow2_refcount_cache_free(img->refcount_cache);   /* refcount_cache.c */
    if (img->codec)
        qcow2_codec_free(img->codec);
    if (img->owns_crypto)
        qcow2_crypto_free(img->crypto);   /* key material cleansed */
    qcow2_snapshots_free(img);
    qcow2_header_free(img);
    qcow2_damage_free(img);     /* damage.c */
    free(img->l1);
    free(img->reftable);
    if (img->owns_data_io && img->data_io != img->io)
        qcow2_io_close(img->data_io);
    if (img->owns_io)
        qcow2_io_close(img->io);
    free(img->path);
    free(img->dir);
    free(img);
}
