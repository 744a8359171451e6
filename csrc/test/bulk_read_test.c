/*
 * Bulk reads (csrc/engine/bulk_read.c) from the outside: digest an image
 * through qcow2_bulk_* with a given number of worker threads and print
 *   sha256 <hex>
 *   damage <start> <length> <unit_start>      (zero mode, one per range)
 *   error <code> <message>                    (instead, on failure)
 * With `direct`, the range is read by qcow2_bulk_read (convert's way) in
 * steps that cut clusters, instead of qcow2_bulk_next's chunks.
 * spec/digest_spec.lua compares the output for -1 (no threads), 1, 2 and
 * 3 workers, both ways, with qemu-img's export. Built by `make
 * test-progs` (and by `make tsan` with -fsanitize=thread); never part of
 * the module.
 *
 * usage: bulk_read_test IMAGE THREADS [zero] [direct] [OFFSET LENGTH]
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "../qcow2.h"

/* direct: bytes per qcow2_bulk_read (odd, so steps cut clusters) */
#define DIRECT_STEP ((size_t)(3 << 18) + 4096 + 512)

static int print_damage(void *ctx, uint64_t start, uint64_t length,
                        uint64_t unit_start, const char *reason)
{
    (void)ctx;
    (void)reason;
    printf("damage %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", start, length,
           unit_start);
    return 0;
}

int main(int argc, char **argv)
{
    qcow2_open_opts opts;
    qcow2_error err;
    qcow2_image *img;
    qcow2_bulk *b;
    EVP_MD_CTX *md;
    unsigned char sum[EVP_MAX_MD_SIZE];
    unsigned int sum_len = 0;
    uint64_t offset = 0, length;
    int zero = 0, direct = 0, rc, argi = 3;
    uint8_t *buf = NULL;

    if (argc < 3) {
        fprintf(stderr, "usage: %s IMAGE THREADS [zero] [direct] "
                "[OFFSET LENGTH]\n", argv[0]);
        return 2;
    }
    for (; argi < argc; argi++) {
        if (strcmp(argv[argi], "zero") == 0)
            zero = 1;
        else if (strcmp(argv[argi], "direct") == 0)
            direct = 1;
        else
            break;
    }
    qcow2_open_opts_init(&opts);
    if (qcow2_open(argv[1], &opts, &img, &err) != 0) {
        printf("error %d %s\n", err.code, err.msg);
        return 1;
    }
    length = qcow2_virtual_size(img);
    if (argc >= argi + 2) {
        offset = strtoull(argv[argi], NULL, 0);
        length = strtoull(argv[argi + 1], NULL, 0);
    }
    md = EVP_MD_CTX_new();
    if (!md || !EVP_DigestInit_ex(md, EVP_sha256(), NULL))
        return 3;
    rc = qcow2_bulk_open(img, offset, direct ? 0 : length, atoi(argv[2]),
                         zero ? print_damage : NULL, NULL, &b);
    if (direct && rc == 0) {
        buf = malloc(DIRECT_STEP);
        if (!buf)
            return 3;
        for (uint64_t done = 0; rc == 0 && done < length;) {
            size_t n = length - done < DIRECT_STEP ? (size_t)(length - done)
                                                   : DIRECT_STEP;
            rc = qcow2_bulk_read(b, offset + done, buf, n);
            if (rc == 0)
                EVP_DigestUpdate(md, buf, n);
            done += n;
        }
    }
    while (rc == 0 && !direct) {
        const void *data;
        size_t n;
        rc = qcow2_bulk_next(b, &data, &n);
        if (rc != 0 || n == 0)
            break;
        EVP_DigestUpdate(md, data, n);
    }
    qcow2_bulk_close(b);
    if (rc != 0) {
        printf("error %d %s\n", rc, qcow2_errmsg(img));
    } else {
        EVP_DigestFinal_ex(md, sum, &sum_len);
        printf("sha256 ");
        for (unsigned int i = 0; i < sum_len; i++)
            printf("%02x", sum[i]);
        printf("\n");
    }
    EVP_MD_CTX_free(md);
    free(buf);
    qcow2_close(img);
    return rc != 0;
}
