/* The floor under a chain read: only the system calls it cannot avoid.
 *
 * bench/chain_read.py compiles and runs this next to our reader. It reads
 * a tip's whole disk in CHUNK-sized pieces into one reused buffer, exactly
 * as our reader's "reads only" run does, but knows nothing of qcow2: the
 * pieces come from `qemu-img map --output=json` (QEMU's answer, not ours),
 * one pread per piece of a chunk that holds data, a memset for the rest.
 * No index lookup, no Python. What depth costs here, depth costs any
 * reader that copies through read(2).
 *
 * usage: pread_floor CHUNK PIECES FILE...
 *   PIECES: lines "start length depth data offset" (data 0/1), in disk
 *   order; FILE k is the image at depth k (0 = the tip).
 * prints: the seconds of the whole-disk pass.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    uint64_t start, length, offset;
    int depth, data;
} piece_t;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: pread_floor CHUNK PIECES FILE...\n");
        return 2;
    }
    uint64_t chunk = strtoull(argv[1], NULL, 10);
    FILE *f = fopen(argv[2], "r");
    if (!f || chunk == 0) {
        perror(argv[2]);
        return 2;
    }
    size_t n = 0, cap = 1024;
    piece_t *p = malloc(cap * sizeof *p);
    piece_t q;
    while (fscanf(f, "%lu %lu %d %d %lu", &q.start, &q.length, &q.depth, &q.data, &q.offset) == 5) {
        if (n == cap) {
            cap *= 2;
            p = realloc(p, cap * sizeof *p);
        }
        if (!p) return 2;
        p[n++] = q;
    }
    fclose(f);
    int nfiles = argc - 3;
    int *fds = malloc(sizeof(int) * (size_t)nfiles);
    for (int k = 0; k < nfiles; k++) {
        fds[k] = open(argv[3 + k], O_RDONLY);
        if (fds[k] < 0) {
            perror(argv[3 + k]);
            return 2;
        }
    }
    char *buf = aligned_alloc(4096, (chunk + 4095) / 4096 * 4096);
    if (!buf || n == 0) return 2;
    uint64_t size = p[n - 1].start + p[n - 1].length;

    double t0 = now();
    size_t i = 0;
    for (uint64_t pos = 0; pos < size; pos += chunk) {
        uint64_t end = pos + chunk < size ? pos + chunk : size;
        while (p[i].start + p[i].length <= pos) i++;
        for (size_t j = i; j < n && p[j].start < end; j++) {
            uint64_t a = p[j].start > pos ? p[j].start : pos;
            uint64_t b = p[j].start + p[j].length < end ? p[j].start + p[j].length : end;
            char *dst = buf + (a - pos);
            if (!p[j].data) {
                memset(dst, 0, b - a);
                continue;
            }
            if (p[j].depth >= nfiles) return 3;
            uint64_t host = p[j].offset + (a - p[j].start), done = 0;
            while (done < b - a) {
                ssize_t got = pread(fds[p[j].depth], dst + done, b - a - done, (off_t)(host + done));
                if (got <= 0) {
                    perror("pread");
                    return 1;
                }
                done += (uint64_t)got;
            }
        }
    }
    printf("%.6f\n", now() - t0);
    return 0;
}
