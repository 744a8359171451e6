/*
 * qcow2_open_memory from the command line, for spec/libfuzzer_spec.lua:
 * open_memory_test FILE [rw] loads FILE into memory, opens it (read-write
 * with "rw", then writes guest byte 0 and flushes), and prints one line:
 *   ok backing=<name|-> chain=<0|1> byte0=<hex> size=<virtual size>
 * or
 *   error <code> <message>
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../qcow2.h"

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    unsigned char *data = NULL;
    long n;

    if (!f)
        return NULL;
    if (fseek(f, 0, SEEK_END) == 0 && (n = ftell(f)) >= 0 &&
        fseek(f, 0, SEEK_SET) == 0 && (data = malloc((size_t)n + 1))) {
        *len = fread(data, 1, (size_t)n, f);
    }
    fclose(f);
    return data;
}

int main(int argc, char **argv)
{
    qcow2_open_opts opts;
    qcow2_image *img;
    qcow2_error err;
    unsigned char byte = 0, *data;
    size_t len = 0;
    int rw = argc > 2 && strcmp(argv[2], "rw") == 0;

    if (argc < 2 || !(data = slurp(argv[1], &len))) {
        fprintf(stderr, "usage: open_memory_test FILE [rw]\n");
        return 2;
    }
    qcow2_open_opts_init(&opts);
    opts.read_write = rw;
    if (qcow2_open_memory(data, len, &opts, &img, &err) < 0) {
        printf("error %s %s\n", qcow2_status_name(err.code), err.msg);
        free(data);
        return 0;
    }
    if (rw && (qcow2_write(img, 0, "\x7e", 1) < 0 || qcow2_flush(img) < 0))
        printf("write failed: %s\n", qcow2_errmsg(img));
    if (qcow2_read(img, 0, &byte, 1) < 0)
        printf("read failed: %s\n", qcow2_errmsg(img));
    printf("ok backing=%s chain=%d byte0=%02x size=%llu\n",
           qcow2_backing_name(img) ? qcow2_backing_name(img) : "-",
           qcow2_backing(img) != NULL, byte,
           (unsigned long long)qcow2_virtual_size(img));
    qcow2_close(img);
    free(data);
    return 0;
}
