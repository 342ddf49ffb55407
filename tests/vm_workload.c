/*
 * The guest's workload for the VM tests (tests/test_vm.py, bench/vm_guest.py):
 * numbered 4 KiB records written to the guest's disk with O_DIRECT, fsynced
 * in batches, each batch announced on the serial console once it is durable,
 * so the host can say, for every backup it triggers, which records must be in
 * it, and which must not.
 *
 * Why records and not a file system: a record carries its own identity (slot,
 * generation, batch, sequence number) and a checksum of its whole 4 KiB, so a
 * backup can be checked record by record: torn (checksum), stale (older than
 * what the guest had synced before the trigger), or from the future (a batch
 * the guest started only after the trigger returned).
 *
 * The schedule (tests/vmguest.py computes the same): PASSES passes over
 * SLOTS slots (a power of two); pass p writes slot (i * A_p + C_p) mod SLOTS
 * as its i-th record, A_p odd, so every pass writes every slot once, in a
 * different order. Record n (counting from 0 over all passes) is in batch
 * n / BATCH and has generation p + 1. Slot s lives at byte s * SPACING.
 *
 * Record layout, little-endian 64-bit words:
 *   0 magic "BFSVMREC", 1 slot, 2 generation, 3 batch, 4 sequence number n,
 *   5..510 n * K + j (j the word's index), 511 CRC-32 (zlib's) of bytes
 *   0..4087 in its low half, zero above.
 *
 * Console protocol (lines start with "BFS "):
 *   BFS start SLOTS PASSES BATCH SPACING WRITERS   the schedule, before the first write
 *   BFS synced B                             batch B is written and fsynced
 *   BFS mark K next B                        host line "T K" read between batches:
 *                                            batches >= B start after it was read
 *                                            (host line "S": stop after this batch)
 *   BFS verify ok|bad ...                    the device read back after the last batch
 *   BFS done records N bytes B seconds S     summary (writes and fsyncs only)
 *   BFS error ...                            anything that went wrong
 *
 * Parameters come from the environment (the kernel hands unknown
 * name=value arguments of its command line to init): bfs_dev, bfs_slots,
 * bfs_passes, bfs_batch, bfs_spacing, bfs_writers.
 *
 * bfs_writers threads write each batch's records between them (record n by
 * thread n mod WRITERS), so that many requests are in flight at once, as a
 * guest's page cache or database has them; the batch's fsync comes after
 * all of them returned.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define RECORD 4096
#define WORDS (RECORD / 8)
#define MAGIC 0x434552564d534642ULL /* "BFSVMREC" little-endian */
#define K 0x9E3779B97F4A7C15ULL

static uint32_t crc_table[256];

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32(const unsigned char *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static uint64_t env_u64(const char *name, uint64_t fallback) {
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 0) : fallback;
}

/* The schedule's multiplier and offset of pass p (same formulas in vmguest.py). */
static uint64_t pass_a(uint64_t p, uint64_t slots) { return (2 * (p * 7919 + 40503) + 1) % slots | 1; }
static uint64_t pass_c(uint64_t p, uint64_t slots) { return (p * 2654435761ULL) % slots; }

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Host lines waiting on the console: answer each "T K" with the next batch;
   "S" asks the workload to stop after the batch it has just synced (so a
   fast guest, under KVM, writes as long as the host needs, not a fixed
   count). */
static char line[256];
static size_t line_len;
static int stop_requested;

static void read_marks(uint64_t next_batch) {
    struct pollfd pfd = {.fd = 0, .events = POLLIN};
    while (poll(&pfd, 1, 0) > 0 && (pfd.revents & POLLIN)) {
        char c;
        ssize_t r = read(0, &c, 1);
        if (r <= 0)
            return;
        if (c == '\n' || c == '\r') {
            line[line_len] = 0;
            unsigned long long k;
            if (line_len && sscanf(line, "T %llu", &k) == 1)
                printf("BFS mark %llu next %" PRIu64 "\n", k, next_batch);
            else if (line_len == 1 && line[0] == 'S')
                stop_requested = 1;
            line_len = 0;
        } else if (line_len < sizeof line - 1) {
            line[line_len++] = c;
        }
    }
    fflush(stdout);
}

static void fill(uint64_t *w, uint64_t slot, uint64_t gen, uint64_t batch, uint64_t n) {
    w[0] = MAGIC;
    w[1] = slot;
    w[2] = gen;
    w[3] = batch;
    w[4] = n;
    for (uint64_t j = 5; j < WORDS - 1; j++)
        w[j] = n * K + j;
    w[WORDS - 1] = crc32((const unsigned char *)w, RECORD - 8);
}

/* The batch the writer threads are on: records [batch_first, batch_end). */
static int fd;
static uint64_t slots, passes, batch, spacing, writers;
static uint64_t batch_first, batch_end;
static int stopping, failed;
static pthread_barrier_t go, done;

static void *writer(void *arg) {
    uint64_t t = (uint64_t)(uintptr_t)arg;
    uint64_t *w;
    if (posix_memalign((void **)&w, RECORD, RECORD)) {
        printf("BFS error no memory\n");
        exit(1);
    }
    for (;;) {
        pthread_barrier_wait(&go);
        if (stopping)
            return NULL;
        for (uint64_t n = batch_first + t; n < batch_end && !failed; n += writers) {
            uint64_t p = n / slots, i = n % slots;
            uint64_t slot = (i * pass_a(p, slots) + pass_c(p, slots)) % slots;
            fill(w, slot, p + 1, n / batch, n);
            ssize_t r = pwrite(fd, w, RECORD, (off_t)(slot * spacing));
            if (r != RECORD) {
                printf("BFS error write record %" PRIu64 " slot %" PRIu64 ": %s\n", n, slot,
                       r < 0 ? strerror(errno) : "short write");
                failed = 1;
            }
        }
        pthread_barrier_wait(&done);
    }
}

int main(void) {
    const char *dev = getenv("bfs_dev") ? getenv("bfs_dev") : "/dev/vda";
    slots = env_u64("bfs_slots", 4096), passes = env_u64("bfs_passes", 3);
    batch = env_u64("bfs_batch", 256), spacing = env_u64("bfs_spacing", 8192);
    writers = env_u64("bfs_writers", 1);
    if (slots == 0 || (slots & (slots - 1)) || batch == 0 || spacing < RECORD || spacing % RECORD ||
        writers == 0 || writers > 64) {
        printf("BFS error bad parameters slots=%" PRIu64 " batch=%" PRIu64 " spacing=%" PRIu64
               " writers=%" PRIu64 "\n", slots, batch, spacing, writers);
        return 2;
    }
    crc_init();
    /* The host's lines arrive on the console: no echo (it would mix into
       ours), and never block on them. */
    struct termios t;
    if (tcgetattr(0, &t) == 0) {
        t.c_lflag &= ~(ECHO | ECHONL);
        tcsetattr(0, TCSANOW, &t);
    }
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);

    fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("BFS error open %s: %s\n", dev, strerror(errno));
        return 1;
    }
    pthread_barrier_init(&go, NULL, writers + 1);
    pthread_barrier_init(&done, NULL, writers + 1);
    pthread_t threads[64];
    for (uint64_t i = 0; i < writers; i++)
        if (pthread_create(&threads[i], NULL, writer, (void *)(uintptr_t)i)) {
            printf("BFS error cannot start writer %" PRIu64 "\n", i);
            return 1;
        }
    uint64_t total = slots * passes, written = 0;
    printf("BFS start %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", slots, passes, batch,
           spacing, writers);
    fflush(stdout);
    double t0 = now();
    for (uint64_t b = 0; b * batch < total && !stop_requested; b++) {
        batch_first = b * batch;
        batch_end = batch_first + batch < total ? batch_first + batch : total;
        pthread_barrier_wait(&go);
        pthread_barrier_wait(&done);
        if (failed)
            return 1;
        if (fsync(fd)) {
            printf("BFS error fsync after batch %" PRIu64 ": %s\n", b, strerror(errno));
            return 1;
        }
        written = batch_end;
        printf("BFS synced %" PRIu64 "\n", b);
        read_marks(b + 1);
    }
    double seconds = now() - t0;
    stopping = 1;
    pthread_barrier_wait(&go);
    for (uint64_t i = 0; i < writers; i++)
        pthread_join(threads[i], NULL);

    /* Read every slot back: the last record written there, whole (a slot
       this run never wrote is not checked: the disk may hold an earlier
       run's records). */
    uint64_t *w, *last = malloc(slots * sizeof *last);
    if (!last || posix_memalign((void **)&w, RECORD, RECORD)) {
        printf("BFS error no memory\n");
        return 1;
    }
    memset(last, 0xFF, slots * sizeof *last);
    for (uint64_t n = 0; n < written; n++) {
        uint64_t p = n / slots, i = n % slots;
        last[(i * pass_a(p, slots) + pass_c(p, slots)) % slots] = n;
    }
    uint64_t bad = 0, first_bad = 0, checked = 0;
    for (uint64_t s = 0; s < slots; s++) {
        if (last[s] == UINT64_MAX)
            continue;
        checked++;
        ssize_t r = pread(fd, w, RECORD, (off_t)(s * spacing));
        int ok = r == RECORD && w[0] == MAGIC && w[1] == s && w[4] == last[s] && w[2] == last[s] / slots + 1 &&
                 w[WORDS - 1] == crc32((const unsigned char *)w, RECORD - 8);
        if (!ok && bad++ == 0)
            first_bad = s;
    }
    if (bad)
        printf("BFS verify bad %" PRIu64 " slots, first %" PRIu64 "\n", bad, first_bad);
    else
        printf("BFS verify ok %" PRIu64 " slots\n", checked);
    printf("BFS done records %" PRIu64 " bytes %" PRIu64 " seconds %.6f\n", written, written * RECORD, seconds);
    fflush(stdout);
    close(fd);
    return bad ? 1 : 0;
}
