/* bt_bitmap.c: the dirty map's bits, one per chunk, safe for concurrent markers.
 *
 * Writers to the tracked device mark chunks from several threads while the migration thread
 * takes the dirty set; the one property that matters is "no lost update" (ARCHITECTURE.md,
 * invariant 1): a bit set at any moment ends up either still in the map or in exactly one
 * snapshot, never in neither. So:
 *   - set/clear change words only with atomic fetch-or / fetch-and, never load-modify-store, so
 *     two markers in the same word cannot undo each other;
 *   - snapshot_clear takes each word with one atomic exchange against 0 and ORs it into the
 *     destination: a marker's fetch-or lands either before the exchange (the bit moves) or after
 *     it (the bit stays); there is no window between reading and clearing;
 *   - readers (test, next_set, count, copy_out) use atomic loads, so each word is seen whole.
 * The map as a whole is not one atomic snapshot while markers run; each word is.
 *
 * Bits past nbits in the last word are always 0 (set_range is bounds-checked and copy_in
 * rejects them), so count and next_set need no masking. A bitmap of 0 bits is valid and empty.
 * The struct is caller-owned; init allocates the words and free releases them.
 */
#include <errno.h>
#include <stdlib.h>

#include "bt_core.h"

#define BT_ATOMIC_ORDER __ATOMIC_SEQ_CST

static inline uint64_t bt_load(const uint64_t *w)
{
    return __atomic_load_n(w, __ATOMIC_ACQUIRE);
}

/* Mask of bits [lo, hi) inside one word, 0 <= lo < hi <= 64. */
static inline uint64_t bt_mask(unsigned lo, unsigned hi)
{
    uint64_t upper = hi == 64 ? ~(uint64_t)0 : (((uint64_t)1 << hi) - 1);

    return upper & ~(((uint64_t)1 << lo) - 1);
}

int bt_bitmap_init(struct bt_bitmap *bm, uint64_t nbits)
{
    uint64_t nwords = nbits / 64 + (nbits % 64 != 0);

    bm->words = NULL;
    bm->nbits = 0;
    bm->nwords = 0;
    if (nwords > SIZE_MAX / sizeof(uint64_t))
        return -EOVERFLOW;
    /* At least one word so that words is never NULL for an empty map. */
    bm->words = calloc(nwords ? nwords : 1, sizeof(uint64_t));
    if (bm->words == NULL)
        return -ENOMEM;
    bm->nbits = nbits;
    bm->nwords = nwords;
    return 0;
}

void bt_bitmap_free(struct bt_bitmap *bm)
{
    free(bm->words);
    bm->words = NULL;
    bm->nbits = 0;
    bm->nwords = 0;
}

static int bt_range_ok(const struct bt_bitmap *bm, uint64_t first, uint64_t count)
{
    return first <= bm->nbits && count <= bm->nbits - first;
}

/* Apply op (1 = set, 0 = clear) to [first, first + count). */
static int bt_bitmap_apply(struct bt_bitmap *bm, uint64_t first, uint64_t count, int set)
{
    uint64_t end, w, last_w;

    if (!bt_range_ok(bm, first, count))
        return -ERANGE;
    if (count == 0)
        return 0;
    end = first + count; /* exclusive */
    w = first / 64;
    last_w = (end - 1) / 64;
    for (; w <= last_w; w++) {
        unsigned lo = w == first / 64 ? (unsigned)(first % 64) : 0;
        unsigned hi = w == last_w ? (unsigned)((end - 1) % 64) + 1 : 64;
        uint64_t mask = bt_mask(lo, hi);

        if (set)
            __atomic_fetch_or(&bm->words[w], mask, BT_ATOMIC_ORDER);
        else
            __atomic_fetch_and(&bm->words[w], ~mask, BT_ATOMIC_ORDER);
    }
    return 0;
}

int bt_bitmap_set_range(struct bt_bitmap *bm, uint64_t first, uint64_t count)
{
    return bt_bitmap_apply(bm, first, count, 1);
}

int bt_bitmap_clear_range(struct bt_bitmap *bm, uint64_t first, uint64_t count)
{
    return bt_bitmap_apply(bm, first, count, 0);
}

int bt_bitmap_test(const struct bt_bitmap *bm, uint64_t index)
{
    if (index >= bm->nbits)
        return -ERANGE;
    return (int)((bt_load(&bm->words[index / 64]) >> (index % 64)) & 1);
}

/* First bit at or after start whose value is `want` (inverting the word for clear bits). */
static int64_t bt_bitmap_next(const struct bt_bitmap *bm, uint64_t start, int want)
{
    uint64_t w, word;

    if (start >= bm->nbits)
        return -ENOENT;
    w = start / 64;
    word = want ? bt_load(&bm->words[w]) : ~bt_load(&bm->words[w]);
    word &= ~(((uint64_t)1 << (start % 64)) - 1);
    for (;;) {
        if (word != 0) {
            uint64_t i = w * 64 + (uint64_t)__builtin_ctzll(word);

            /* An inverted last word has its padding bits set: they are not clear bits. */
            return i < bm->nbits ? (int64_t)i : -ENOENT;
        }
        if (++w >= bm->nwords)
            return -ENOENT;
        word = want ? bt_load(&bm->words[w]) : ~bt_load(&bm->words[w]);
    }
}

int64_t bt_bitmap_next_set(const struct bt_bitmap *bm, uint64_t start)
{
    return bt_bitmap_next(bm, start, 1);
}

int64_t bt_bitmap_next_clear(const struct bt_bitmap *bm, uint64_t start)
{
    return bt_bitmap_next(bm, start, 0);
}

int64_t bt_bitmap_collect(const struct bt_bitmap *bm, uint64_t start, uint64_t *out,
                          uint64_t max)
{
    uint64_t n = 0;

    if (start >= bm->nbits || max == 0)
        return 0;
    for (uint64_t w = start / 64; w < bm->nwords && n < max; w++) {
        uint64_t word = bt_load(&bm->words[w]);

        if (w == start / 64)
            word &= ~(((uint64_t)1 << (start % 64)) - 1);
        while (word != 0 && n < max) {
            out[n++] = w * 64 + (uint64_t)__builtin_ctzll(word);
            word &= word - 1;
        }
    }
    return (int64_t)n;
}

int64_t bt_bitmap_count(const struct bt_bitmap *bm)
{
    int64_t n = 0;

    for (uint64_t w = 0; w < bm->nwords; w++)
        n += __builtin_popcountll(bt_load(&bm->words[w]));
    return n;
}

int64_t bt_bitmap_snapshot_clear(struct bt_bitmap *src, struct bt_bitmap *dst)
{
    int64_t moved = 0;

    if (src->nbits != dst->nbits)
        return -EINVAL;
    for (uint64_t w = 0; w < src->nwords; w++) {
        uint64_t bits;

        if (bt_load(&src->words[w]) == 0)
            continue; /* skip the locked exchange on clean words: most of a big map */
        bits = __atomic_exchange_n(&src->words[w], 0, BT_ATOMIC_ORDER);
        if (bits != 0) {
            __atomic_fetch_or(&dst->words[w], bits, BT_ATOMIC_ORDER);
            moved += __builtin_popcountll(bits);
        }
    }
    return moved;
}

int bt_bitmap_copy_out(const struct bt_bitmap *bm, uint64_t *words, uint64_t nwords)
{
    if (nwords != bm->nwords)
        return -EINVAL;
    for (uint64_t w = 0; w < nwords; w++)
        words[w] = bt_load(&bm->words[w]);
    return 0;
}

int bt_bitmap_copy_in(struct bt_bitmap *bm, const uint64_t *words, uint64_t nwords)
{
    if (nwords != bm->nwords)
        return -EINVAL;
    if (nwords > 0 && bm->nbits % 64 != 0
        && (words[nwords - 1] & ~bt_mask(0, (unsigned)(bm->nbits % 64))) != 0)
        return -EINVAL;
    for (uint64_t w = 0; w < nwords; w++)
        __atomic_store_n(&bm->words[w], words[w], BT_ATOMIC_ORDER);
    return 0;
}
