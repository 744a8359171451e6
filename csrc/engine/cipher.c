/*
 * Sector ciphers as QEMU's qcrypto applies them: each 512-byte sector
 * encrypted alone, with an IV made from its sector number by the IV
 * generator (plain: low 32 bits little-endian; plain64: 64 bits
 * little-endian; essiv: plain64 encrypted in ECB under hash(key)), zero
 * padded to the cipher's IV size. OpenSSL EVP does every cipher.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include "crypto.h"

enum { IV_NONE, IV_PLAIN, IV_PLAIN64, IV_ESSIV };

struct qcow2_cipher {
    EVP_CIPHER_CTX *enc, *dec;  /* keyed once; only the IV changes */
    EVP_CIPHER_CTX *essiv;      /* ECB under hash(key), essiv only */
    int ivgen;
    size_t iv_len;
};

static int aes_bits(const char *alg)
{
    if (strcmp(alg, "aes-128") == 0)
        return 128;
    if (strcmp(alg, "aes-192") == 0)
        return 192;
    if (strcmp(alg, "aes-256") == 0)
        return 256;
    return 0;
}

/* OpenSSL's cipher for the spec; NULL when it has none (aes-192-xts). */
static const EVP_CIPHER *evp_cipher(const qcow2_cipher_spec *spec)
{
    char name[32];
    int bits = aes_bits(spec->alg);

    if (!bits || (strcmp(spec->mode, "ecb") && strcmp(spec->mode, "cbc") &&
                  strcmp(spec->mode, "xts")))
        return NULL;
    snprintf(name, sizeof name, "aes-%d-%s", bits, spec->mode);
    return EVP_get_cipherbyname(name);
}

size_t qcow2_cipher_key_bytes(const qcow2_cipher_spec *spec)
{
    const EVP_CIPHER *cipher = evp_cipher(spec);

    return cipher ? (size_t)EVP_CIPHER_key_length(cipher) : 0;
}

static int ivgen_of(const qcow2_cipher_spec *spec)
{
    if (strcmp(spec->ivgen, "plain") == 0)
        return IV_PLAIN;
    if (strcmp(spec->ivgen, "plain64") == 0)
        return IV_PLAIN64;
    if (strcmp(spec->ivgen, "essiv") == 0)
        return IV_ESSIV;
    return spec->ivgen[0] ? -1 : IV_NONE;
}

static EVP_CIPHER_CTX *keyed(const EVP_CIPHER *cipher, const uint8_t *key,
                             int enc)
{
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();

    if (ctx && EVP_CipherInit_ex(ctx, cipher, NULL, key, NULL, enc) == 1 &&
        EVP_CIPHER_CTX_set_padding(ctx, 0) == 1)
        return ctx;
    EVP_CIPHER_CTX_free(ctx);
    return NULL;
}

/* ESSIV's cipher: AES in ECB whose key size is the hash's digest size
 * (QEMU's qcrypto_block_luks_essiv_cipher), keyed with hash(key). */
static int essiv_new(qcow2_cipher *c, const qcow2_cipher_spec *spec,
                     const uint8_t *key, size_t key_len, char *why,
                     size_t why_len)
{
    const EVP_MD *md = EVP_get_digestbyname(spec->ivgen_hash);
    uint8_t salt[EVP_MAX_MD_SIZE];
    unsigned int salt_len = 0;
    const EVP_CIPHER *ecb;

    if (!md) {
        snprintf(why, why_len, "unknown ESSIV hash '%s'", spec->ivgen_hash);
        return QCOW2_E_UNSUPPORTED;
    }
    switch (EVP_MD_size(md)) {
    case 16: ecb = EVP_aes_128_ecb(); break;
    case 24: ecb = EVP_aes_192_ecb(); break;
    case 32: ecb = EVP_aes_256_ecb(); break;
    default:
        snprintf(why, why_len, "no AES key size for ESSIV hash '%s'",
                 spec->ivgen_hash);
        return QCOW2_E_UNSUPPORTED;
    }
    if (EVP_Digest(key, key_len, salt, &salt_len, md, NULL) != 1)
        return QCOW2_E_NOMEM;
    c->essiv = keyed(ecb, salt, 1);
    OPENSSL_cleanse(salt, sizeof salt);
    return c->essiv ? 0 : QCOW2_E_NOMEM;
}

int qcow2_cipher_new(const qcow2_cipher_spec *spec, const uint8_t *key,
                     size_t key_len, qcow2_cipher **out, char *why,
                     size_t why_len)
{
    const EVP_CIPHER *cipher = evp_cipher(spec);
    qcow2_cipher *c;
    int ivgen = ivgen_of(spec), rc;

    *out = NULL;
    if (!cipher || ivgen < 0 || (ivgen == IV_NONE) !=
                                    (strcmp(spec->mode, "ecb") == 0)) {
        snprintf(why, why_len, "unsupported cipher %s-%s-%s", spec->alg,
                 spec->mode, spec->ivgen);
        return QCOW2_E_UNSUPPORTED;
    }
    if (key_len != (size_t)EVP_CIPHER_key_length(cipher)) {
        snprintf(why, why_len, "key of %zu bytes for %s-%s (needs %d)",
                 key_len, spec->alg, spec->mode,
                 EVP_CIPHER_key_length(cipher));
        return QCOW2_E_INVALID;
    }
    c = calloc(1, sizeof *c);
    if (!c)
        return QCOW2_E_NOMEM;
    c->ivgen = ivgen;
    c->iv_len = (size_t)EVP_CIPHER_iv_length(cipher);
    c->enc = keyed(cipher, key, 1);
    c->dec = keyed(cipher, key, 0);
    rc = c->enc && c->dec ? 0 : QCOW2_E_NOMEM;
    if (rc == 0 && ivgen == IV_ESSIV)
        rc = essiv_new(c, spec, key, key_len, why, why_len);
    if (rc < 0) {
        if (rc == QCOW2_E_NOMEM)
            snprintf(why, why_len, "cannot set up the %s-%s cipher",
                     spec->alg, spec->mode);
        qcow2_cipher_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void qcow2_cipher_free(qcow2_cipher *c)
{
    if (!c)
        return;
    /* EVP_CIPHER_CTX_free cleanses the key schedules. */
    EVP_CIPHER_CTX_free(c->enc);
    EVP_CIPHER_CTX_free(c->dec);
    EVP_CIPHER_CTX_free(c->essiv);
    free(c);
}

static int make_iv(qcow2_cipher *c, uint64_t sector, uint8_t *iv)
{
    int n = 0;

    memset(iv, 0, EVP_MAX_IV_LENGTH);
    if (c->ivgen == IV_NONE)
        return 0;
    if (c->ivgen == IV_PLAIN)
        sector &= 0xffffffffu;
    for (int i = 0; i < 8 && (size_t)i < c->iv_len; i++)
        iv[i] = (uint8_t)(sector >> (8 * i));
    if (c->ivgen != IV_ESSIV)
        return 0;
    return EVP_EncryptUpdate(c->essiv, iv, &n, iv, (int)c->iv_len) == 1 &&
                   (size_t)n == c->iv_len ? 0 : -1;
}

int qcow2_cipher_sectors(qcow2_cipher *c, uint64_t sector, uint8_t *buf,
                         size_t len, int enc)
{
    EVP_CIPHER_CTX *ctx = enc ? c->enc : c->dec;
    uint8_t iv[EVP_MAX_IV_LENGTH];

    for (size_t at = 0; at < len; at += QCOW2_CRYPTO_SECTOR, sector++) {
        int n = 0;

        if (make_iv(c, sector, iv) < 0 ||
            EVP_CipherInit_ex(ctx, NULL, NULL, NULL,
                              c->ivgen == IV_NONE ? NULL : iv, -1) != 1 ||
            EVP_CipherUpdate(ctx, buf + at, &n, buf + at,
                             (int)QCOW2_CRYPTO_SECTOR) != 1 ||
            n != (int)QCOW2_CRYPTO_SECTOR)
            return QCOW2_E_IO;
    }
    return 0;
}
