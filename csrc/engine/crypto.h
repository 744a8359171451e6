/*
 * Encryption on the read path (layer 5): the sector cipher both formats
 * use (crypto.c), the LUKS1 header and its keyslots (luks.c), and a
 * handle's crypto context made at open. OpenSSL's EVP interfaces only.
 */
#ifndef QCOW2_CRYPTO_H
#define QCOW2_CRYPTO_H

#include "cluster.h"

#define QCOW2_CRYPTO_SECTOR     512u

/* ---- Sector ciphers (crypto.c) ------------------------------------------ */

/* What QEMU's qcrypto names a sector cipher by (qemu-img info's words). */
typedef struct qcow2_cipher_spec {
    char alg[16];               /* "aes-128", "aes-192", "aes-256" */
    char mode[8];               /* "ecb", "cbc", "xts" */
    char ivgen[8];              /* "plain", "plain64", "essiv" ("" for ecb) */
    char ivgen_hash[16];        /* essiv only */
} qcow2_cipher_spec;

typedef struct qcow2_cipher qcow2_cipher;

/* Key bytes the spec takes (xts: two keys), 0 when not supported. */
size_t qcow2_cipher_key_bytes(const qcow2_cipher_spec *spec);
/* A cipher keyed with key (copied into OpenSSL's contexts only). Returns
 * 0, or a negative status with why filled. */
int qcow2_cipher_new(const qcow2_cipher_spec *spec, const uint8_t *key,
                     size_t key_len, qcow2_cipher **out, char *why,
                     size_t why_len);
void qcow2_cipher_free(qcow2_cipher *c);
/* Encrypt (enc = 1) or decrypt in place len bytes (a multiple of 512)
 * whose first sector has IV sector number `sector`. */
int qcow2_cipher_sectors(qcow2_cipher *c, uint64_t sector, uint8_t *buf,
                         size_t len, int enc);

/* ---- LUKS1 (luks.c) ------------------------------------------------------ */

#define QCOW2_LUKS_SLOTS        8
#define QCOW2_LUKS_STRIPES      4000u
#define QCOW2_LUKS_HEADER_BYTES 592u
/* PBKDF2 iterations above this are refused (bounded work at open):
 * 2^24, about ten seconds of SHA-256 on one core today, some hundred
 * times what qemu-img's one-second default picks. */
#define QCOW2_LUKS_MAX_ITERS    (1u << 24)

typedef struct qcow2_luks_slot {
    int active;
    uint32_t iters;
    uint8_t salt[32];
    uint32_t key_offset;        /* sectors from the region's start */
    uint32_t stripes;
} qcow2_luks_slot;

typedef struct qcow2_luks_header {
    char cipher_name[33], cipher_mode[33], hash[33];
    uint32_t payload_offset;    /* sectors */
    uint32_t key_bytes;
    uint8_t mk_digest[20];
    uint8_t mk_salt[32];
    uint32_t mk_iters;
    char uuid[41];
    qcow2_luks_slot slots[QCOW2_LUKS_SLOTS];
    qcow2_cipher_spec spec;     /* from cipher name, mode and key bytes */
} qcow2_luks_header;

/* Parse and validate the 592 header bytes against a region of
 * region_len bytes: a refusal fills why with one line naming the field. */
int qcow2_luks_parse(const uint8_t *b, uint64_t region_len,
                     qcow2_luks_header *h, char *why, size_t why_len);
/* The header bytes of h (big-endian, 592 bytes). */
void qcow2_luks_encode(const qcow2_luks_header *h, uint8_t *b);
/* Split key material of one slot: key_bytes * stripes bytes rounded up to
 * whole sectors, and the per-slot spacing QEMU uses (4 KiB aligned). */
uint64_t qcow2_luks_material_bytes(uint32_t key_bytes);
/* Derive (PBKDF2) and AF-merge: the master key (h->key_bytes into mk) of
 * the first active slot the passphrase opens. region reads the key
 * material through the image. Returns 0, QCOW2_E_KEY, or another status
 * with why filled. */
int qcow2_luks_unlock(qcow2_image *img, const qcow2_luks_header *h,
                      uint64_t region_offset, const uint8_t *pass,
                      size_t pass_len, uint8_t *mk, char *why,
                      size_t why_len);
/* Anti-forensic split/merge and PBKDF2, exposed for creation. */
int qcow2_luks_af_split(const char *hash, const uint8_t *key, size_t len,
                        uint32_t stripes, uint8_t *out);
int qcow2_luks_pbkdf2(const char *hash, const uint8_t *pass, size_t pass_len,
                      const uint8_t *salt, size_t salt_len, uint32_t iters,
                      uint8_t *out, size_t out_len);

/* ---- A new LUKS region (luks_format.c) ------------------------------------- */

/* The region (header and key material, payload-offset bytes, calloc'd
 * into *region) for the options (defaults filled in by the caller). */
int qcow2_luks_format(const qcow2_encrypt_opts *p, uint8_t **region,
                      uint64_t *region_len, char *why, size_t why_len);

/* ---- A handle's context (crypto.c) --------------------------------------- */

/* Open-time setup: AES keys from the passphrase, LUKS keyslots unlocked.
 * An unencrypted image ignores the key. A missing or wrong LUKS key is
 * QCOW2_E_KEY. */
int qcow2_crypto_open(qcow2_image *img, const char *key, size_t key_len);
void qcow2_crypto_free(qcow2_crypto *c);
/* The LUKS header facts (NULL for AES or no encryption). */
const qcow2_luks_header *qcow2_crypto_luks(const qcow2_image *img);
/* Guest data in place: [guest, guest + len) stored at host (both 512
 * aligned, len a multiple of 512). AES numbers sectors by guest offset,
 * LUKS by host offset (QEMU's crypt_physical_offset). */
int qcow2_crypt_data(qcow2_image *img, uint64_t guest, uint64_t host,
                     uint8_t *buf, size_t len, int enc);

#endif /* QCOW2_CRYPTO_H */
