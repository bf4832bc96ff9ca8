/* Guest side of the backend crash test (tests/guest/crash.sh).
 *
 * JOBS processes write their own region of the disk, one 4 KiB block at a
 * time, DEPTH writes in flight each (Linux AIO, O_DIRECT), PASSES times over
 * the region, with an fdatasync (a virtio-blk FLUSH) every 32 writes and
 * after every pass.
 * READERS more processes read regions nobody writes until the writers are
 * done: even ones 4 KiB blocks of holes in the sparse image (DEPTH in
 * flight), which a backend answers at once, ahead of older writes, as mixed
 * loads do on real disks (out-of-order completion); odd ones 1 MiB blocks of
 * zeros the host wrote (4 in flight), which keep the disk busy. Every
 * block of pass p carries a header (magic, job, block, pass) and a pattern
 * derived from them. An error, a short write or a failed flush is reported
 * at once; a lost request shows as a hang (the host's timeout). At the end
 * each job reads its region back and checks it holds the last pass.
 *
 *   crash-writer DEV JOBS BLOCKS PASSES DEPTH READERS
 *
 * Prints "RF: ..." lines for the host. Static, no libaio: raw syscalls.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define BLOCK 4096
#define MAGIC 0x52464352u /* "RCFR" */
#define BASE (1 << 20)    /* first byte written: 1 MiB into the disk */

static void fill(uint8_t *buf, uint32_t job, uint32_t block, uint32_t pass)
{
    uint32_t hdr[4] = {MAGIC, job, block, pass};
    memcpy(buf, hdr, sizeof(hdr));
    for (int i = 16; i < BLOCK; i++)
        buf[i] = (uint8_t)(job * 7 + block * 13 + pass * 31 + i);
}

static int run_job(const char *dev, uint32_t job, uint32_t blocks, uint32_t passes, int depth)
{
    int fd = open(dev, O_RDWR | O_DIRECT);
    if (fd < 0) {
        printf("RF: FAIL job %u open: %m\n", job);
        return 1;
    }
    uint8_t *bufs;
    if (posix_memalign((void **)&bufs, BLOCK, (size_t)depth * BLOCK)) {
        printf("RF: FAIL job %u memory\n", job);
        return 1;
    }
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) < 0) {
        printf("RF: FAIL job %u io_setup: %m\n", job);
        return 1;
    }
    struct iocb *cbs = calloc(depth, sizeof(*cbs));
    int *free_slots = calloc(depth, sizeof(int));
    int nfree = depth;
    for (int i = 0; i < depth; i++)
        free_slots[i] = depth - 1 - i;
    uint64_t region = BASE + (uint64_t)job * blocks * BLOCK;
    for (uint32_t pass = 0; pass < passes; pass++) {
        uint32_t next = 0, done = 0;
        while (done < blocks) {
            while (nfree > 0 && next < blocks) {
                int s = free_slots[--nfree];
                uint8_t *buf = bufs + (size_t)s * BLOCK;
                fill(buf, job, next, pass);
                struct iocb *cb = &cbs[s];
                memset(cb, 0, sizeof(*cb));
                cb->aio_fildes = fd;
                cb->aio_lio_opcode = IOCB_CMD_PWRITE;
                cb->aio_buf = (uint64_t)(uintptr_t)buf;
                cb->aio_nbytes = BLOCK;
                cb->aio_offset = region + (uint64_t)next * BLOCK;
                cb->aio_data = (uint64_t)s;
                struct iocb *list[1] = {cb};
                if (syscall(SYS_io_submit, ctx, 1, list) != 1) {
                    printf("RF: FAIL job %u io_submit: %m\n", job);
                    return 1;
                }
                next++;
            }
            struct io_event ev[64];
            long n = syscall(SYS_io_getevents, ctx, 1, 64, ev, NULL);
            if (n < 0) {
                printf("RF: FAIL job %u io_getevents: %m\n", job);
                return 1;
            }
            for (long i = 0; i < n; i++) {
                if (ev[i].res != BLOCK) {
                    printf("RF: FAIL job %u pass %u write result %lld\n", job, pass,
                           (long long)ev[i].res);
                    return 1;
                }
                free_slots[nfree++] = (int)ev[i].data;
                done++;
                /* A flush now and then amid the other jobs' writes, as a
                 * database does: the slowest request, and so the one the
                 * others overtake. */
                if (done % 32 == 0 && fdatasync(fd)) {
                    printf("RF: FAIL job %u pass %u flush: %m\n", job, pass);
                    return 1;
                }
            }
        }
        if (fdatasync(fd)) {
            printf("RF: FAIL job %u pass %u flush: %m\n", job, pass);
            return 1;
        }
        printf("RF: job %u pass %u flushed\n", job, pass);
        fflush(stdout);
    }
    /* Read back: every block holds the last pass. */
    uint8_t want[BLOCK];
    for (uint32_t b = 0; b < blocks; b++) {
        if (pread(fd, bufs, BLOCK, region + (uint64_t)b * BLOCK) != BLOCK) {
            printf("RF: FAIL job %u read back block %u: %m\n", job, b);
            return 1;
        }
        fill(want, job, b, passes - 1);
        if (memcmp(bufs, want, BLOCK)) {
            uint32_t hdr[4];
            memcpy(hdr, bufs, sizeof(hdr));
            printf("RF: FAIL job %u block %u holds magic %08x job %u block %u pass %u\n", job, b,
                   hdr[0], hdr[1], hdr[2], hdr[3]);
            return 1;
        }
    }
    printf("RF: PASS job %u: %u blocks x %u passes, read back\n", job, blocks, passes);
    return 0;
}

/* Reads random SIZE-byte blocks of [from, from + span) until killed, DEPTH
 * at a time; they must read back as zeros. */
static int run_reader(const char *dev, uint32_t id, uint64_t from, uint64_t span, int depth,
                      size_t size)
{
    int fd = open(dev, O_RDONLY | O_DIRECT);
    uint8_t *bufs;
    aio_context_t ctx = 0;
    if (fd < 0 || posix_memalign((void **)&bufs, BLOCK, (size_t)depth * size) ||
        syscall(SYS_io_setup, depth, &ctx) < 0) {
        printf("RF: FAIL reader %u set-up: %m\n", id);
        return 1;
    }
    struct iocb *cbs = calloc(depth, sizeof(*cbs));
    uint64_t seed = 0x9E3779B97F4A7C15ull * (id + 1);
    for (;;) {
        for (int s = 0; s < depth; s++) {
            struct iocb *cb = &cbs[s];
            seed = seed * 6364136223846793005ull + 1442695040888963407ull;
            memset(cb, 0, sizeof(*cb));
            cb->aio_fildes = fd;
            cb->aio_lio_opcode = IOCB_CMD_PREAD;
            cb->aio_buf = (uint64_t)(uintptr_t)(bufs + (size_t)s * size);
            cb->aio_nbytes = size;
            cb->aio_offset = from + ((seed >> 33) % (span / size)) * size;
            cb->aio_data = (uint64_t)s;
            struct iocb *list[1] = {cb};
            if (syscall(SYS_io_submit, ctx, 1, list) != 1) {
                printf("RF: FAIL reader %u io_submit: %m\n", id);
                return 1;
            }
        }
        for (long left = depth; left > 0;) {
            struct io_event ev[64];
            long n = syscall(SYS_io_getevents, ctx, 1, left < 64 ? left : 64, ev, NULL);
            if (n < 0) {
                printf("RF: FAIL reader %u io_getevents: %m\n", id);
                return 1;
            }
            for (long i = 0; i < n; i++) {
                uint8_t *buf = bufs + (size_t)ev[i].data * size;
                if (ev[i].res != (long long)size || buf[0] != 0 || memcmp(buf, buf + 1, size - 1)) {
                    printf("RF: FAIL reader %u read result %lld\n", id, (long long)ev[i].res);
                    return 1;
                }
            }
            left -= n;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s DEV JOBS BLOCKS PASSES DEPTH READERS\n", argv[0]);
        return 2;
    }
    const char *dev = argv[1];
    uint32_t jobs = atoi(argv[2]), blocks = atoi(argv[3]), passes = atoi(argv[4]);
    int depth = atoi(argv[5]);
    uint32_t readers = atoi(argv[6]);
    setvbuf(stdout, NULL, _IOLBF, 0);
    pid_t reader_pids[16];
    /* Even readers: 4 KiB from holes (DATA_END..) the backend answers at once.
     * Odd readers: 1 MiB from zeros the host wrote at [8, 32) MiB, which take
     * the disk a while: requests in flight whenever the backend is killed. */
    for (uint32_t r = 0; r < readers && r < 16; r++) {
        reader_pids[r] = fork();
        if (reader_pids[r] == 0)
            _exit(r % 2 ? run_reader(dev, r, 8 << 20, 24 << 20, 4, 1 << 20)
                        : run_reader(dev, r, 40 << 20, 24 << 20, depth, BLOCK));
    }
    pid_t writer_pids[64];
    for (uint32_t j = 0; j < jobs && j < 64; j++) {
        writer_pids[j] = fork();
        if (writer_pids[j] == 0)
            _exit(run_job(dev, j, blocks, passes, depth));
    }
    int ok = 0;
    for (uint32_t j = 0; j < jobs && j < 64; j++) {
        int st;
        if (waitpid(writer_pids[j], &st, 0) > 0 && WIFEXITED(st) && WEXITSTATUS(st) == 0)
            ok++;
    }
    int readers_ok = 0;
    for (uint32_t r = 0; r < readers && r < 16; r++) {
        int st;
        kill(reader_pids[r], SIGTERM);
        if (waitpid(reader_pids[r], &st, 0) > 0 && WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM)
            readers_ok++;
    }
    printf("RF: writers done %d/%u, readers %d/%u\n", ok, jobs, readers_ok, readers);
    return ok == (int)jobs && readers_ok == (int)readers ? 0 : 1;
}
