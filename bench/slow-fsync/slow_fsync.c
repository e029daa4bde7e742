/*
 * slow_fsync.so: makes every fsync and fdatasync of the process that preloads it take at least
 * SLOW_FSYNC_US microseconds longer (default 2000), to measure a server on a "slow-fsync day"
 * on a machine whose disk is fast: the sleep comes before the real call, so the data is as
 * durable as without it, only later. Nothing else is touched (reads and writes go straight to
 * the kernel), unlike a FUSE file system, which would slow every I/O.
 *
 *   gcc -O2 -shared -fPIC -o slow_fsync.so slow_fsync.c -ldl
 *   LD_PRELOAD=$PWD/slow_fsync.so SLOW_FSYNC_US=2000 postgres ...
 *
 * Used by scripts/postgres (MICROMSG_PG_SLOW_FSYNC_US) for docs/performance.md; never by a test.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>
#include <errno.h>

static long delay_us(void) {
    static long us = -1;
    if (us < 0) {
        const char *s = getenv("SLOW_FSYNC_US");
        us = s ? atol(s) : 2000;
        if (us < 0) us = 0;
    }
    return us;
}

static void slow(void) {
    long us = delay_us();
    struct timespec t = { us / 1000000, (us % 1000000) * 1000 };
    int saved = errno;
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {}
    errno = saved;
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    slow();
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    slow();
    return real(fd);
}
