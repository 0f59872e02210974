/* bt_zero.c: is a chunk all zeros?
 *
 * The sender asks this of every 1 MiB chunk, so it must run at memory speed. The trick: check
 * the first 16 bytes by hand; if they are zero, the buffer is all zero exactly when it equals
 * itself shifted by 16 bytes, which memcmp (vectorised in glibc) answers without a zero page to
 * compare against (and without a global one). The first non-zero byte stops it early, so data
 * chunks cost almost nothing.
 */
#include <string.h>

#include "bt_core.h"

int bt_is_zero(const void *buf, size_t len)
{
    const unsigned char *p = buf;
    size_t head = len < 16 ? len : 16;

    for (size_t i = 0; i < head; i++) {
        if (p[i] != 0)
            return 0;
    }
    if (len <= 16)
        return 1;
    return memcmp(p, p + 16, len - 16) == 0;
}
