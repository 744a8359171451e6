/*
 * A new LUKS1 region as QEMU's qcrypto_block_luks_create lays it out:
 * header at 0, key material of slot i at 8 + i * (material rounded to
 * 8 sectors) sectors, payload offset after the eighth slot; slot 0
 * active, the others off. Master key, salts and uuid from RAND_bytes;
 * PBKDF2 iterations calibrated from OpenSSL's measured speed so that a
 * slot costs about iter_time ms (the master-key digest an eighth of it),
 * at least 1000 each, at most QCOW2_LUKS_MAX_ITERS.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "crypto.h"

#define MIN_ITERS       1000u
#define HEADER_SECTORS  8u

static double cpu_seconds(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Iterations per second of PBKDF2 with hash, measured over >= 20 ms. */
static double pbkdf2_rate(const char *hash, size_t key_bytes)
{
    static const uint8_t pass[] = "calibration", salt[32] = { 0 };
    uint8_t out[64];
    double elapsed = 0;
    uint32_t iters = 1u << 10;

    for (;;) {
        double start = cpu_seconds();

        if (qcow2_luks_pbkdf2(hash, pass, sizeof pass - 1, salt, sizeof salt,
                              iters, out, key_bytes) < 0)
            return 0;
        elapsed = cpu_seconds() - start;
        if (elapsed >= 0.02 || iters >= (1u << 24))
            break;
        iters *= 2;
    }
    return elapsed > 0 ? iters / elapsed : (double)iters * 1e3;
}

static uint32_t iters_for(double rate, double ms)
{
    double n = rate * ms / 1000.0;

    if (n < MIN_ITERS)
        return MIN_ITERS;
    return n > QCOW2_LUKS_MAX_ITERS ? QCOW2_LUKS_MAX_ITERS : (uint32_t)n;
}

static void make_uuid(const uint8_t r[16], char *out)
{
    uint8_t u[16];

    memcpy(u, r, 16);
    u[6] = (uint8_t)((u[6] & 0x0f) | 0x40);     /* version 4 */
    u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);     /* RFC 4122 variant */
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-"
             "%02x%02x%02x%02x%02x%02x", u[0], u[1], u[2], u[3], u[4], u[5],
             u[6], u[7], u[8], u[9], u[10], u[11], u[12], u[13], u[14], u[15]);
}

/* The spec and header strings from qemu-img's encrypt.* options. */
static int plan_header(const qcow2_encrypt_opts *p, qcow2_luks_header *h,
                       char *why, size_t why_len)
{
    qcow2_cipher_spec *s = &h->spec;
    size_t kb;

    memset(h, 0, sizeof *h);
    if (strlen(p->cipher_alg) >= sizeof s->alg ||
        strlen(p->cipher_mode) >= sizeof s->mode ||
        strlen(p->ivgen_alg) >= sizeof s->ivgen ||
        strlen(p->ivgen_hash_alg) >= sizeof s->ivgen_hash ||
        strlen(p->hash_alg) >= sizeof h->hash) {
        snprintf(why, why_len, "encryption option too long");
        return QCOW2_E_INVALID;
    }
    strcpy(s->alg, p->cipher_alg);
    strcpy(s->mode, p->cipher_mode);
    if (strcmp(s->mode, "ecb") != 0)
        strcpy(s->ivgen, p->ivgen_alg);
    if (strcmp(s->ivgen, "essiv") == 0)
        strcpy(s->ivgen_hash, p->ivgen_hash_alg);
    strcpy(h->hash, p->hash_alg);
    kb = qcow2_cipher_key_bytes(s);
    if (kb == 0 || kb > 64) {
        snprintf(why, why_len, "cipher %s in mode %s is not supported",
                 s->alg, s->mode);
        return QCOW2_E_INVALID;
    }
    if (!EVP_get_digestbyname(h->hash)) {
        snprintf(why, why_len, "hash '%s' is not supported", h->hash);
        return QCOW2_E_INVALID;
    }
    h->key_bytes = (uint32_t)kb;
    strcpy(h->cipher_name, "aes");
    if (s->ivgen[0])
        snprintf(h->cipher_mode, sizeof h->cipher_mode, "%s-%s%s%s",
                 s->mode, s->ivgen, s->ivgen_hash[0] ? ":" : "",
                 s->ivgen_hash);
    else
        strcpy(h->cipher_mode, s->mode);
    return 0;
}

/* Slot 0's key material: the AF-split master key encrypted under the
 * PBKDF2 of the passphrase. */
static int write_slot(const qcow2_luks_header *h, const qcow2_encrypt_opts *p,
                      const uint8_t *mk, uint8_t *region, char *why,
                      size_t why_len)
{
    const qcow2_luks_slot *s = &h->slots[0];
    uint8_t *material = region + (size_t)s->key_offset * QCOW2_CRYPTO_SECTOR;
    size_t bytes = (size_t)qcow2_luks_material_bytes(h->key_bytes);
    uint8_t slot_key[64];
    qcow2_cipher *c = NULL;
    int rc;

    rc = qcow2_luks_pbkdf2(h->hash, (const uint8_t *)p->key, p->key_len,
                           s->salt, 32, s->iters, slot_key, h->key_bytes);
    if (rc == 0)
        rc = qcow2_luks_af_split(h->hash, mk, h->key_bytes, s->stripes,
                                 material);
    if (rc == 0)
        rc = qcow2_cipher_new(&h->spec, slot_key, h->key_bytes, &c, why,
                              why_len);
    if (rc == 0)
        rc = qcow2_cipher_sectors(c, 0, material, bytes, 1);
    qcow2_cipher_free(c);
    OPENSSL_cleanse(slot_key, sizeof slot_key);
    return rc;
}

int qcow2_luks_format(const qcow2_encrypt_opts *p, uint8_t **region_out,
                      uint64_t *region_len, char *why, size_t why_len)
{
    qcow2_luks_header h;
    uint8_t mk[64], rnd[16];
    uint64_t slot_sectors;
    double rate;
    uint8_t *region = NULL;
    int rc;

    *region_out = NULL;
    rc = plan_header(p, &h, why, why_len);
    if (rc < 0)
        return rc;
    slot_sectors = qcow2_luks_material_bytes(h.key_bytes) /
                   QCOW2_CRYPTO_SECTOR;
    h.payload_offset = (uint32_t)(HEADER_SECTORS +
                                  QCOW2_LUKS_SLOTS * slot_sectors);
    rate = pbkdf2_rate(h.hash, h.key_bytes);
    h.mk_iters = iters_for(rate, (double)p->iter_time_ms / 8);
    for (size_t i = 0; i < QCOW2_LUKS_SLOTS; i++) {
        h.slots[i].key_offset = (uint32_t)(HEADER_SECTORS +
                                           i * slot_sectors);
        h.slots[i].stripes = QCOW2_LUKS_STRIPES;
    }
    h.slots[0].active = 1;
    h.slots[0].iters = iters_for(rate, (double)p->iter_time_ms);
    *region_len = (uint64_t)h.payload_offset * QCOW2_CRYPTO_SECTOR;
    region = calloc(1, (size_t)*region_len);
    if (!region) {
        snprintf(why, why_len, "out of memory");
        return QCOW2_E_NOMEM;
    }
    if (RAND_bytes(mk, (int)h.key_bytes) != 1 ||
        RAND_bytes(h.mk_salt, 32) != 1 ||
        RAND_bytes(h.slots[0].salt, 32) != 1 || RAND_bytes(rnd, 16) != 1) {
        snprintf(why, why_len, "no random bytes from OpenSSL");
        rc = QCOW2_E_IO;
    }
    make_uuid(rnd, h.uuid);
    if (rc == 0)
        rc = qcow2_luks_pbkdf2(h.hash, mk, h.key_bytes, h.mk_salt, 32,
                               h.mk_iters, h.mk_digest, 20);
    if (rc == 0)
        rc = write_slot(&h, p, mk, region, why, why_len);
    OPENSSL_cleanse(mk, sizeof mk);
    if (rc < 0) {
        if (!why[0])
            snprintf(why, why_len, "cannot set up the LUKS header");
        free(region);
        return rc;
    }
    qcow2_luks_encode(&h, region);
    *region_out = region;
    return 0;
}
