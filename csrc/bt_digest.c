/* bt_digest.c: XXH3-128 of a chunk, in the canonical (big-endian) form.
 *
 * Verification compares a digest of every chunk as it was sent with one of it as it was written
 * (or read back). Hashing 1 MiB costs ~57 us on one core against ~550 us per chunk of a 1.9 GB/s
 * copy, so it must not run on the Python main thread that paces the stream: the I/O engine
 * (bt_aio.c) calls this in its worker threads, on the buffer a request just read or wrote.
 * libxxhash (Debian's libxxhash-dev) provides XXH3_128bits; python-xxhash's xxh3_128_digest is
 * the same function and byte order (a unit test holds them equal).
 */
#include <errno.h>
#include <xxhash.h>

#include "bt_core.h"

int bt_digest128(const void *buf, size_t len, uint8_t *out)
{
    XXH128_canonical_t canon;

    if (out == NULL || (buf == NULL && len > 0))
        return -EFAULT;
    XXH128_canonicalFromHash(&canon, XXH3_128bits(buf, len));
    for (size_t i = 0; i < sizeof(canon.digest); i++)
        out[i] = canon.digest[i];
    return 0;
}
