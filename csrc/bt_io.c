/* bt_io.c: one whole read or write, however many system calls it takes.
 *
 * pread/pwrite may transfer less than asked (signals, device limits, end of file). These loops
 * carry on from where the last call stopped, retry EINTR and EAGAIN, and stop at end of file.
 * A read that meets end of file early returns the bytes it got; deciding whether that is an
 * error (a device that shrank) is the caller's job, since only it knows the expected size.
 *
 * O_DIRECT wrinkle: reading the tail of a regular file whose size is not a multiple of the
 * block size returns the few bytes that exist; the next pread then starts at an unaligned
 * offset and fails with EINVAL. After progress, EINVAL at an offset that is not 512-aligned
 * can only mean that, so it ends the read like end of file does.
 *
 * The async engine's workers (bt_aio.c) run these same loops.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#include <unistd.h>

#include "bt_core.h"

/* EAGAIN on a file or block device is rare (RWF_NOWAIT, a congested device); back off briefly
 * instead of spinning. */
static void bt_backoff(void)
{
    struct timespec ts = { 0, 200 * 1000 };

    nanosleep(&ts, NULL);
}

int64_t bt_pread_full(int fd, void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));

        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n == 0)
            break; /* end of file */
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            bt_backoff();
            continue;
        }
        if (errno == EINVAL && done > 0 && ((off + done) & 511) != 0)
            break; /* unaligned O_DIRECT tail of a regular file: see the note above */
        return -errno;
    }
    return (int64_t)done;
}

int64_t bt_pwrite_full(int fd, const void *buf, size_t len, uint64_t off)
{
    size_t done = 0;

    while (done < len) {
        ssize_t n = pwrite(fd, (const char *)buf + done, len - done, (off_t)(off + done));

        if (n > 0) {
            done += (size_t)n;
            continue;
        }
        if (n == 0)
            break; /* no progress: report the short count rather than spin */
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN) {
            bt_backoff();
            continue;
        }
        return -errno;
    }
    return (int64_t)done;
}

int bt_fdatasync(int fd)
{
    while (fdatasync(fd) != 0) {
        if (errno != EINTR)
            return -errno;
    }
    return 0;
}
