/*
 * A handle's crypto context, made at open from the passphrase:
 * - legacy AES (crypt_method 1): the passphrase's bytes up to its first
 *   NUL, truncated or zero padded to 16, are the AES-128-CBC key (QEMU's
 *   qcrypto_block_qcow_init); IV plain64 of the GUEST sector. Nothing in
 *   the image checks the key: a wrong one reads as garbage.
 * - LUKS (crypt_method 2): the header in the extension's region, a
 *   keyslot unlocked (luks.c); the header's cipher with IV from the HOST
 *   sector (QEMU's crypt_physical_offset).
 * Key bytes live only in OpenSSL's contexts; every copy is cleansed.
 * Snapshot views share their parent's context.
 */
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>

#include "crypto.h"

struct qcow2_crypto {
    uint32_t method;
    qcow2_cipher *cipher;
    qcow2_luks_header *luks;    /* LUKS only: the parsed header */
};

void qcow2_crypto_free(qcow2_crypto *c)
{
    if (!c)
        return;
    qcow2_cipher_free(c->cipher);
    if (c->luks)
        OPENSSL_cleanse(c->luks, sizeof *c->luks);
    free(c->luks);
    free(c);
}

static int open_aes(qcow2_image *img, qcow2_crypto *c, const char *key)
{
    static const qcow2_cipher_spec spec = { "aes-128", "cbc", "plain64", "" };
    uint8_t k[16] = { 0 };
    char why[160] = "";
    size_t n = strnlen(key, sizeof k);
    int rc;

    memcpy(k, key, n);
    rc = qcow2_cipher_new(&spec, k, sizeof k, &c->cipher, why, sizeof why);
    OPENSSL_cleanse(k, sizeof k);
    return rc < 0 ? qcow2_fail(img, rc, "%s", why) : 0;
}

static int open_luks(qcow2_image *img, qcow2_crypto *c, const char *key,
                     size_t key_len)
{
    uint64_t offset = img->ext.crypto_header_offset;
    uint64_t length = img->ext.crypto_header_length;
    uint8_t raw[QCOW2_LUKS_HEADER_BYTES], mk[64];
    char why[200] = "";
    int rc;

    if (length < QCOW2_LUKS_HEADER_BYTES)
        return qcow2_fail(img, QCOW2_E_CORRUPT, "crypto header region of "
                          "%llu bytes cannot hold a LUKS header",
                          (unsigned long long)length);
    c->luks = calloc(1, sizeof *c->luks);
    if (!c->luks)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    rc = qcow2_read_meta(img, offset, raw, sizeof raw, "LUKS header");
    if (rc < 0)
        return rc;
    rc = qcow2_luks_parse(raw, length, c->luks, why, sizeof why);
    if (rc < 0)
        return qcow2_fail(img, rc, "%s", why);
    if (!key)
        return 0;
    rc = qcow2_luks_unlock(img, c->luks, offset, (const uint8_t *)key,
                           key_len, mk, why, sizeof why);
    if (rc == 0)
        rc = qcow2_cipher_new(&c->luks->spec, mk, c->luks->key_bytes,
                              &c->cipher, why, sizeof why);
    OPENSSL_cleanse(mk, sizeof mk);
    if (rc < 0 && why[0])
        return qcow2_fail(img, rc, "%s", why);
    return rc;
}

int qcow2_crypto_open(qcow2_image *img, const char *key, size_t key_len)
{
    qcow2_crypto *c;
    int rc;

    if (img->hdr.crypt_method == CRYPT_NONE)
        return 0;
    c = calloc(1, sizeof *c);
    if (!c)
        return qcow2_fail(img, QCOW2_E_NOMEM, "out of memory");
    c->method = img->hdr.crypt_method;
    img->crypto = c;
    /* The LUKS header is checked before the key is asked for, so a
     * hostile header fails the same with or without one. */
    rc = c->method == CRYPT_LUKS ? open_luks(img, c, key, key_len) : 0;
    if (rc == 0 && !key)
        rc = qcow2_fail(img, QCOW2_E_KEY, "the image is encrypted (%s) and "
                        "no key was given",
                        c->method == CRYPT_AES ? "AES" : "LUKS");
    if (rc == 0 && c->method == CRYPT_AES)
        rc = open_aes(img, c, key);
    return rc;
}

int qcow2_get_encrypt_info(const qcow2_image *img, qcow2_encrypt_info *out)
{
    const qcow2_luks_header *h = qcow2_crypto_luks(img);

    memset(out, 0, sizeof *out);
    if (!img->crypto)
        return QCOW2_E_INVALID;
    out->method = img->crypto->method;
    if (!h)
        return 0;
    strcpy(out->cipher_alg, h->spec.alg);
    strcpy(out->cipher_mode, h->spec.mode);
    strcpy(out->ivgen_alg, h->spec.ivgen);
    strcpy(out->ivgen_hash_alg, h->spec.ivgen_hash);
    strcpy(out->hash_alg, h->hash);
    strcpy(out->uuid, h->uuid);
    out->payload_offset = (uint64_t)h->payload_offset * QCOW2_CRYPTO_SECTOR;
    out->master_key_iters = h->mk_iters;
    for (size_t i = 0; i < QCOW2_LUKS_SLOTS; i++) {
        out->slots[i].active = h->slots[i].active;
        out->slots[i].iters = h->slots[i].iters;
        out->slots[i].stripes = h->slots[i].stripes;
        out->slots[i].key_offset = (uint64_t)h->slots[i].key_offset *
                                   QCOW2_CRYPTO_SECTOR;
    }
    return 0;
}

const qcow2_luks_header *qcow2_crypto_luks(const qcow2_image *img)
{
    return img->crypto ? img->crypto->luks : NULL;
}

int qcow2_crypt_data(qcow2_image *img, uint64_t guest, uint64_t host,
                     uint8_t *buf, size_t len, int enc)
{
    qcow2_crypto *c = img->crypto;
    uint64_t at = c->method == CRYPT_AES ? guest : host;

    if (!c->cipher || at % QCOW2_CRYPTO_SECTOR || len % QCOW2_CRYPTO_SECTOR)
        return qcow2_fail(img, QCOW2_E_INVALID, "encrypted data at 0x%llx "
                          "(%zu bytes) is not in whole sectors",
                          (unsigned long long)at, len);
    if (qcow2_cipher_sectors(c->cipher, at / QCOW2_CRYPTO_SECTOR, buf, len,
                             enc) < 0)
        return qcow2_fail(img, QCOW2_E_IO, "cannot %s sectors at 0x%llx",
                          enc ? "encrypt" : "decrypt",
                          (unsigned long long)at);
    return 0;
}
