/* I/O errors at one chosen write or fsync: an LD_PRELOAD library for the fault-injection checks.
 *
 * Every write-family call (write, pwrite, pwrite64, writev, pwritev, sendfile, copy_file_range) and
 * every fsync-family call (fsync, fdatasync) on a file whose path starts with one of the prefixes in
 * FOLDIN_FAULT_ROOTS (colon-separated) is counted, across all threads of the process, in call order.
 * The call numbered FOLDIN_FAULT_AT (1-based) of the family FOLDIN_FAULT_KIND ("write" or "fsync")
 * fails with errno FOLDIN_FAULT_ERRNO and changes nothing; every other call runs. With
 * FOLDIN_FAULT_COUNTS set, the counts of both families are written there when the process exits;
 * in the process, foldin_fault_count(family) reads them and foldin_fault_reset() zeroes them. The
 * settings are read at every call, so one process can run many commands, one fault each.
 * Build: cc -shared -fPIC -O2 -o faultinject.so faultinject.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static atomic_long counts[2];  /* 0: write family, 1: fsync family */

static int under_roots(int fd) {
    const char *roots = getenv("FOLDIN_FAULT_ROOTS");
    if (!roots || !*roots) return 0;
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n <= 0) return 0;
    path[n] = 0;
    const char *p = roots;
    while (*p) {
        const char *end = strchr(p, ':');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len && strncmp(path, p, len) == 0) return 1;
        if (!end) break;
        p = end + 1;
    }
    return 0;
}

/* 1 when this call is the one to fail (errno is then set) */
static int fails(int fd, int family) {
    if (!under_roots(fd)) return 0;
    long index = atomic_fetch_add(&counts[family], 1) + 1;
    const char *kind = getenv("FOLDIN_FAULT_KIND"), *at = getenv("FOLDIN_FAULT_AT");
    if (!kind || !at || strcmp(kind, family ? "fsync" : "write") != 0 || atol(at) != index) return 0;
    const char *code = getenv("FOLDIN_FAULT_ERRNO");
    errno = code ? atoi(code) : EIO;
    return 1;
}

#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *buf, size_t n) { REAL(write); return fails(fd, 0) ? -1 : real(fd, buf, n); }
ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    REAL(pwrite); return fails(fd, 0) ? -1 : real(fd, buf, n, off);
}
ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    REAL(pwrite64); return fails(fd, 0) ? -1 : real(fd, buf, n, off);
}
ssize_t writev(int fd, const struct iovec *iov, int cnt) { REAL(writev); return fails(fd, 0) ? -1 : real(fd, iov, cnt); }
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off) {
    REAL(pwritev); return fails(fd, 0) ? -1 : real(fd, iov, cnt, off);
}
ssize_t sendfile(int out, int in, off_t *off, size_t n) { REAL(sendfile); return fails(out, 0) ? -1 : real(out, in, off, n); }
ssize_t copy_file_range(int in, off64_t *in_off, int out, off64_t *out_off, size_t n, unsigned flags) {
    REAL(copy_file_range); return fails(out, 0) ? -1 : real(in, in_off, out, out_off, n, flags);
}
int fsync(int fd) { REAL(fsync); return fails(fd, 1) ? -1 : real(fd); }
int fdatasync(int fd) { REAL(fdatasync); return fails(fd, 1) ? -1 : real(fd); }

long foldin_fault_count(int family) { return atomic_load(&counts[family ? 1 : 0]); }

void foldin_fault_reset(void) {
    atomic_store(&counts[0], 0);
    atomic_store(&counts[1], 0);
}

__attribute__((destructor)) static void report(void) {
    const char *out = getenv("FOLDIN_FAULT_COUNTS");
    if (!out) return;
    FILE *f = fopen(out, "w");
    if (!f) return;
    fprintf(f, "%ld %ld\n", atomic_load(&counts[0]), atomic_load(&counts[1]));
    fclose(f);
}
