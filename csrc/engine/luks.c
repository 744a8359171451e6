/*
 * LUKS1 inside a qcow2 image: the 592-byte big-endian header at the start
 * of the region the full-disk-encryption extension names, validated as
 * QEMU's qcrypto_block_luks_check_header validates it (plus a bound on
 * PBKDF2 iterations so a hostile header cannot stall an open), and the
 * keyslot unlock: PBKDF2 of the passphrase -> decrypt the key material
 * (sectors numbered from 0 at its start) -> anti-forensic merge ->
 * PBKDF2 digest of the candidate compared with the header's.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

#include "crypto.h"

static const uint8_t MAGIC[6] = { 'L', 'U', 'K', 'S', 0xba, 0xbe };
#define SLOT_ACTIVE     0x00AC71F3u
#define SLOT_INACTIVE   0x0000DEADu
/* QEMU's QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET: the header's share, and the
 * alignment of every slot's key material, in sectors. */
#define HEADER_SECTORS  8u

static uint32_t rd32(const uint8_t *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 |
           (uint32_t)b[2] << 8 | b[3];
}

static void wr32(uint8_t *b, uint32_t v)
{
    b[0] = (uint8_t)(v >> 24);
    b[1] = (uint8_t)(v >> 16);
    b[2] = (uint8_t)(v >> 8);
    b[3] = (uint8_t)v;
}

/* A 32-byte (or 40-byte) text field: NUL terminated inside it. */
static int text_field(const uint8_t *b, size_t n, char *out)
{
    if (!memchr(b, 0, n))
        return -1;
    memcpy(out, b, n);
    out[n] = 0;
    return 0;
}

uint64_t qcow2_luks_material_bytes(uint32_t key_bytes)
{
    uint64_t sectors = ((uint64_t)key_bytes * QCOW2_LUKS_STRIPES +
                        QCOW2_CRYPTO_SECTOR - 1) / QCOW2_CRYPTO_SECTOR;

    sectors = (sectors + HEADER_SECTORS - 1) / HEADER_SECTORS *
              HEADER_SECTORS;
    return sectors * QCOW2_CRYPTO_SECTOR;
}

/* "xts-plain64", "cbc-essiv:sha256", "ecb" and the key size -> spec. */
static int parse_spec(qcow2_luks_header *h, char *why, size_t why_len)
{
    qcow2_cipher_spec *s = &h->spec;
    const char *dash = strchr(h->cipher_mode, '-');
    size_t mode_len = dash ? (size_t)(dash - h->cipher_mode)
                           : strlen(h->cipher_mode);
    uint32_t bytes = h->key_bytes;

    memset(s, 0, sizeof *s);
    if (strcmp(h->cipher_name, "aes") != 0 || mode_len >= sizeof s->mode) {
        snprintf(why, why_len, "LUKS cipher %s-%s is not supported",
                 h->cipher_name, h->cipher_mode);
        return QCOW2_E_UNSUPPORTED;
    }
    memcpy(s->mode, h->cipher_mode, mode_len);
    if (dash) {
        const char *iv = dash + 1, *colon = strchr(iv, ':');
        size_t iv_len = colon ? (size_t)(colon - iv) : strlen(iv);

        if (iv_len >= sizeof s->ivgen ||
            (colon && strlen(colon + 1) >= sizeof s->ivgen_hash)) {
            snprintf(why, why_len, "LUKS cipher mode '%s' is not supported",
                     h->cipher_mode);
            return QCOW2_E_UNSUPPORTED;
        }
        memcpy(s->ivgen, iv, iv_len);
        if (colon)
            strcpy(s->ivgen_hash, colon + 1);
    }
    if (strcmp(s->mode, "xts") == 0)
        bytes /= 2;
    snprintf(s->alg, sizeof s->alg, "aes-%u", bytes * 8);
    if (qcow2_cipher_key_bytes(s) == 0 ||
        qcow2_cipher_key_bytes(s) != h->key_bytes) {
        snprintf(why, why_len, "LUKS master key length %u does not fit "
                 "cipher %s-%s", h->key_bytes, h->cipher_name,
                 h->cipher_mode);
        return QCOW2_E_CORRUPT;
    }
    return 0;
}

static int parse_slot(const uint8_t *b, qcow2_luks_slot *s, size_t i,
                      char *why, size_t why_len)
{
    uint32_t active = rd32(b);

    if (active != SLOT_ACTIVE && active != SLOT_INACTIVE) {
        snprintf(why, why_len, "LUKS keyslot %zu state 0x%08x is corrupt",
                 i, active);
        return QCOW2_E_CORRUPT;
    }
    s->active = active == SLOT_ACTIVE;
    s->iters = rd32(b + 4);
    memcpy(s->salt, b + 8, 32);
    s->key_offset = rd32(b + 40);
    s->stripes = rd32(b + 44);
    if (s->stripes != QCOW2_LUKS_STRIPES) {
        snprintf(why, why_len, "LUKS keyslot %zu stripes %u (expected %u)",
                 i, s->stripes, QCOW2_LUKS_STRIPES);
        return QCOW2_E_CORRUPT;
    }
    if (s->active && (s->iters == 0 || s->iters > QCOW2_LUKS_MAX_ITERS)) {
        snprintf(why, why_len, "LUKS keyslot %zu iterations %u out of "
                 "range (1..%u)", i, s->iters, QCOW2_LUKS_MAX_ITERS);
        return QCOW2_E_CORRUPT;
    }
    return 0;
}

/* Key material of every slot inside [header, payload) of the region,
 * and no two slots sharing sectors (QEMU's checks, in sectors). */
static int check_layout(const qcow2_luks_header *h, uint64_t region_len,
                        char *why, size_t why_len)
{
    uint64_t len = qcow2_luks_material_bytes(h->key_bytes) /
                   QCOW2_CRYPTO_SECTOR;
    uint64_t payload = h->payload_offset;

    if (payload < HEADER_SECTORS) {
        snprintf(why, why_len, "LUKS payload offset %u sectors is inside "
                 "the header", h->payload_offset);
        return QCOW2_E_CORRUPT;
    }
    if (payload * QCOW2_CRYPTO_SECTOR > region_len) {
        snprintf(why, why_len, "LUKS payload offset %u sectors is past the "
                 "crypto header region (%llu bytes)", h->payload_offset,
                 (unsigned long long)region_len);
        return QCOW2_E_CORRUPT;
    }
    for (size_t i = 0; i < QCOW2_LUKS_SLOTS; i++) {
        uint64_t start = h->slots[i].key_offset;

        if (start < HEADER_SECTORS) {
            snprintf(why, why_len, "LUKS keyslot %zu key offset %llu "
                     "sectors overlaps the header", i,
                     (unsigned long long)start);
            return QCOW2_E_CORRUPT;
        }
        if (start + len > payload) {
            snprintf(why, why_len, "LUKS keyslot %zu key material (sectors "
                     "%llu..%llu) runs past the payload offset %u", i,
                     (unsigned long long)start,
                     (unsigned long long)(start + len), h->payload_offset);
            return QCOW2_E_CORRUPT;
        }
        for (size_t j = 0; j < i; j++) {
            uint64_t other = h->slots[j].key_offset;
            if (start < other + len && other < start + len) {
                snprintf(why, why_len, "LUKS keyslots %zu and %zu overlap",
                         j, i);
                return QCOW2_E_CORRUPT;
            }
        }
    }
    return 0;
}

int qcow2_luks_parse(const uint8_t *b, uint64_t region_len,
                     qcow2_luks_header *h, char *why, size_t why_len)
{
    int rc;

    memset(h, 0, sizeof *h);
    if (memcmp(b, MAGIC, sizeof MAGIC) != 0) {
        snprintf(why, why_len, "LUKS header magic is wrong");
        return QCOW2_E_CORRUPT;
    }
    if (b[6] != 0 || b[7] != 1) {
        snprintf(why, why_len, "LUKS version %u is not supported (1)",
                 (unsigned)b[6] << 8 | b[7]);
        return QCOW2_E_UNSUPPORTED;
    }
    if (text_field(b + 8, 32, h->cipher_name) < 0 ||
        text_field(b + 40, 32, h->cipher_mode) < 0 ||
        text_field(b + 72, 32, h->hash) < 0 ||
        text_field(b + 168, 40, h->uuid) < 0) {
        snprintf(why, why_len, "LUKS header text field not terminated");
        return QCOW2_E_CORRUPT;
    }
    h->payload_offset = rd32(b + 104);
    h->key_bytes = rd32(b + 108);
    memcpy(h->mk_digest, b + 112, 20);
    memcpy(h->mk_salt, b + 132, 32);
    h->mk_iters = rd32(b + 164);
    if (!EVP_get_digestbyname(h->hash)) {
        snprintf(why, why_len, "LUKS hash '%s' is not supported", h->hash);
        return QCOW2_E_UNSUPPORTED;
    }
    if ((rc = parse_spec(h, why, why_len)) < 0)
        return rc;
    if (h->mk_iters == 0 || h->mk_iters > QCOW2_LUKS_MAX_ITERS) {
        snprintf(why, why_len, "LUKS master key iterations %u out of range "
                 "(1..%u)", h->mk_iters, QCOW2_LUKS_MAX_ITERS);
        return QCOW2_E_CORRUPT;
    }
    for (size_t i = 0; i < QCOW2_LUKS_SLOTS; i++)
        if ((rc = parse_slot(b + 208 + 48 * i, &h->slots[i], i, why,
                             why_len)) < 0)
            return rc;
    return check_layout(h, region_len, why, why_len);
}

void qcow2_luks_encode(const qcow2_luks_header *h, uint8_t *b)
{
    memset(b, 0, QCOW2_LUKS_HEADER_BYTES);
    memcpy(b, MAGIC, sizeof MAGIC);
    b[7] = 1;
    memcpy(b + 8, h->cipher_name, strlen(h->cipher_name));
    memcpy(b + 40, h->cipher_mode, strlen(h->cipher_mode));
    memcpy(b + 72, h->hash, strlen(h->hash));
    wr32(b + 104, h->payload_offset);
    wr32(b + 108, h->key_bytes);
    memcpy(b + 112, h->mk_digest, 20);
    memcpy(b + 132, h->mk_salt, 32);
    wr32(b + 164, h->mk_iters);
    memcpy(b + 168, h->uuid, strlen(h->uuid));
    for (size_t i = 0; i < QCOW2_LUKS_SLOTS; i++) {
        const qcow2_luks_slot *s = &h->slots[i];
        uint8_t *p = b + 208 + 48 * i;

        wr32(p, s->active ? SLOT_ACTIVE : SLOT_INACTIVE);
        wr32(p + 4, s->iters);
        memcpy(p + 8, s->salt, 32);
        wr32(p + 40, s->key_offset);
        wr32(p + 44, s->stripes);
    }
}

int qcow2_luks_pbkdf2(const char *hash, const uint8_t *pass, size_t pass_len,
                      const uint8_t *salt, size_t salt_len, uint32_t iters,
                      uint8_t *out, size_t out_len)
{
    const EVP_MD *md = EVP_get_digestbyname(hash);

    if (!md || iters == 0 || iters > (uint32_t)0x7fffffff)
        return QCOW2_E_INVALID;
    return PKCS5_PBKDF2_HMAC((const char *)pass, (int)pass_len, salt,
                             (int)salt_len, (int)iters, md, (int)out_len,
                             out) == 1 ? 0 : QCOW2_E_NOMEM;
}

/* LUKS1's diffuse: each digest-sized piece i replaced by
 * hash(be32(i) || piece), the last (short) piece truncated. */
static int diffuse(const EVP_MD *md, uint8_t *buf, size_t len)
{
    size_t ds = (size_t)EVP_MD_size(md);
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    uint8_t out[EVP_MAX_MD_SIZE], iv[4];
    int rc = ctx ? 0 : QCOW2_E_NOMEM;

    for (size_t i = 0; rc == 0 && i * ds < len; i++) {
        size_t n = len - i * ds < ds ? len - i * ds : ds;

        wr32(iv, (uint32_t)i);
        if (EVP_DigestInit_ex(ctx, md, NULL) != 1 ||
            EVP_DigestUpdate(ctx, iv, 4) != 1 ||
            EVP_DigestUpdate(ctx, buf + i * ds, n) != 1 ||
            EVP_DigestFinal_ex(ctx, out, NULL) != 1)
            rc = QCOW2_E_NOMEM;
        else
            memcpy(buf + i * ds, out, n);
    }
    OPENSSL_cleanse(out, sizeof out);
    EVP_MD_CTX_free(ctx);
    return rc;
}

/* The accumulator over every stripe but the last: d = diffuse(d ^ s_i). */
static int af_accumulate(const EVP_MD *md, const uint8_t *stripes,
                         size_t len, uint32_t count, uint8_t *d)
{
    int rc = 0;

    memset(d, 0, len);
    for (uint32_t i = 0; rc == 0 && i + 1 < count; i++) {
        for (size_t k = 0; k < len; k++)
            d[k] ^= stripes[(size_t)i * len + k];
        rc = diffuse(md, d, len);
    }
    return rc;
}

int qcow2_luks_af_split(const char *hash, const uint8_t *key, size_t len,
                        uint32_t stripes, uint8_t *out)
{
    const EVP_MD *md = EVP_get_digestbyname(hash);
    uint8_t *d = malloc(len);
    int rc = md && d ? 0 : QCOW2_E_NOMEM;

    /* Random stripes, then the last one that makes the merge give key. */
    if (rc == 0 && RAND_bytes(out, (int)((stripes - 1) * len)) != 1)
        rc = QCOW2_E_IO;
    if (rc == 0)
        rc = af_accumulate(md, out, len, stripes, d);
    for (size_t k = 0; rc == 0 && k < len; k++)
        out[(size_t)(stripes - 1) * len + k] = d[k] ^ key[k];
    if (d)
        OPENSSL_cleanse(d, len);
    free(d);
    return rc;
}

static int af_merge(const char *hash, const uint8_t *material, size_t len,
                    uint32_t stripes, uint8_t *key)
{
    const EVP_MD *md = EVP_get_digestbyname(hash);
    int rc = md ? af_accumulate(md, material, len, stripes, key)
                : QCOW2_E_UNSUPPORTED;

    for (size_t k = 0; rc == 0 && k < len; k++)
        key[k] ^= material[(size_t)(stripes - 1) * len + k];
    return rc;
}

/* One slot: 0 with mk filled, 1 when the passphrase is not this slot's. */
static int try_slot(qcow2_image *img, const qcow2_luks_header *h,
                    const qcow2_luks_slot *s, uint64_t region_offset,
                    const uint8_t *pass, size_t pass_len, uint8_t *mk,
                    uint8_t *material, char *why, size_t why_len)
{
    size_t kb = h->key_bytes, bytes = (size_t)qcow2_luks_material_bytes(
                                          h->key_bytes);
    uint8_t slot_key[64], digest[20];
    qcow2_cipher *c = NULL;
    int rc;

    rc = qcow2_luks_pbkdf2(h->hash, pass, pass_len, s->salt, 32, s->iters,
                           slot_key, kb);
    if (rc == 0)
        rc = qcow2_read_meta(img, region_offset +
                             (uint64_t)s->key_offset * QCOW2_CRYPTO_SECTOR,
                             material, bytes, "LUKS key material");
    if (rc == 0)
        rc = qcow2_cipher_new(&h->spec, slot_key, kb, &c, why, why_len);
    if (rc == 0)
        rc = qcow2_cipher_sectors(c, 0, material, bytes, 0);
    if (rc == 0)
        rc = af_merge(h->hash, material, kb, s->stripes, mk);
    if (rc == 0)
        rc = qcow2_luks_pbkdf2(h->hash, mk, kb, h->mk_salt, 32, h->mk_iters,
                               digest, sizeof digest);
    if (rc == 0 && CRYPTO_memcmp(digest, h->mk_digest, sizeof digest) != 0)
        rc = 1;
    qcow2_cipher_free(c);
    OPENSSL_cleanse(slot_key, sizeof slot_key);
    OPENSSL_cleanse(digest, sizeof digest);
    OPENSSL_cleanse(material, bytes);
    return rc;
}

int qcow2_luks_unlock(qcow2_image *img, const qcow2_luks_header *h,
                      uint64_t region_offset, const uint8_t *pass,
                      size_t pass_len, uint8_t *mk, char *why,
                      size_t why_len)
{
    size_t bytes = (size_t)qcow2_luks_material_bytes(h->key_bytes);
    uint8_t *material = malloc(bytes);
    int rc = 1;

    if (!material)
        return QCOW2_E_NOMEM;
    for (size_t i = 0; rc == 1 && i < QCOW2_LUKS_SLOTS; i++) {
        const qcow2_luks_slot *s = &h->slots[i];
        uint64_t end = region_offset +
                       (uint64_t)s->key_offset * QCOW2_CRYPTO_SECTOR + bytes;

        if (!s->active)
            continue;
        if (end > img->file_size) {
            snprintf(why, why_len, "LUKS keyslot %zu key material ends at "
                     "0x%llx, past the end of the file", i,
                     (unsigned long long)end);
            rc = QCOW2_E_CORRUPT;
            break;
        }
        rc = try_slot(img, h, s, region_offset, pass, pass_len, mk,
                      material, why, why_len);
    }
    free(material);
    if (rc == 1) {
        OPENSSL_cleanse(mk, h->key_bytes);
        snprintf(why, why_len, "the key opens no LUKS keyslot (wrong key)");
        return QCOW2_E_KEY;
    }
    return rc;
}
