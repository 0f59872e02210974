/* test_bt_bitmap.c: stress test of bt_bitmap_snapshot_clear against concurrent markers.
 *
 * Python threads (tests/unit/test_bitmap.py) call into C microseconds apart, too coarse to hit the
 * window between reading a word and clearing it. Here marker threads set bits in tight loops while
 * the main thread snapshots in a tight loop, for many rounds. In each round every bit is set exactly
 * once, by one of NTHREADS markers (bit i belongs to thread i % NTHREADS, so every word is shared by
 * all of them); at the end of the round each bit must have been moved into the accumulated snapshot
 * exactly once: moved == NBITS and the source is empty. A lost update shows as moved < NBITS, a
 * bit taken twice as moved > NBITS.
 *
 * Not part of the extension: tests/unit/test_bitmap.py compiles it with bt_bitmap.c and runs it.
 * Usage: test_bt_bitmap [rounds]; exit status 0 on success.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>

#include "bt_core.h"

#define NTHREADS 4
#define NBITS (64 * 64 + 7)

struct marker {
    struct bt_bitmap *bm;
    pthread_barrier_t *start;
    int *finished;       /* markers done with this round (atomic) */
    unsigned k;
    unsigned seed;
    int failed;
};

static void *marker_main(void *arg)
{
    struct marker *m = arg;
    uint64_t order[NBITS / NTHREADS + 1];
    uint64_t n = 0;

    for (uint64_t i = m->k; i < NBITS; i += NTHREADS)
        order[n++] = i;
    for (uint64_t i = n - 1; i > 0; i--) { /* shuffle, so markers collide in varying words */
        uint64_t j = (uint64_t)rand_r(&m->seed) % (i + 1), t = order[i];

        order[i] = order[j];
        order[j] = t;
    }
    pthread_barrier_wait(m->start);
    for (uint64_t i = 0; i < n; i++) {
        if (bt_bitmap_set_range(m->bm, order[i], 1) != 0)
            m->failed = 1;
    }
    __atomic_fetch_add(m->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

static int run_round(unsigned round, int *snapshots_with_bits)
{
    struct bt_bitmap src, dst;
    struct marker markers[NTHREADS];
    pthread_t threads[NTHREADS];
    pthread_barrier_t start;
    int finished = 0;
    int64_t moved = 0;
    int rc = 0;

    if (bt_bitmap_init(&src, NBITS) != 0 || bt_bitmap_init(&dst, NBITS) != 0)
        return -ENOMEM;
    pthread_barrier_init(&start, NULL, NTHREADS + 1);
    for (unsigned k = 0; k < NTHREADS; k++) {
        markers[k] = (struct marker){ &src, &start, &finished, k, round * NTHREADS + k + 1, 0 };
        pthread_create(&threads[k], NULL, marker_main, &markers[k]);
    }
    pthread_barrier_wait(&start);
    for (;;) {
        /* Read "all finished" before snapshotting: that snapshot then sees every mark. */
        int last = __atomic_load_n(&finished, __ATOMIC_ACQUIRE) == NTHREADS;
        int64_t n = bt_bitmap_snapshot_clear(&src, &dst);

        if (n < 0)
            return (int)n;
        if (n > 0 && !last)
            (*snapshots_with_bits)++;
        moved += n;
        if (last)
            break;
    }
    for (unsigned k = 0; k < NTHREADS; k++) {
        pthread_join(threads[k], NULL);
        if (markers[k].failed)
            rc = -EIO;
    }
    if (moved != NBITS || bt_bitmap_count(&dst) != NBITS || bt_bitmap_count(&src) != 0) {
        fprintf(stderr, "round %u: moved %lld bits, snapshot holds %lld, source %lld; want %d, %d, 0\n",
                round, (long long)moved, (long long)bt_bitmap_count(&dst),
                (long long)bt_bitmap_count(&src), NBITS, NBITS);
        rc = -EIO;
    }
    pthread_barrier_destroy(&start);
    bt_bitmap_free(&dst);
    bt_bitmap_free(&src);
    return rc;
}

int main(int argc, char **argv)
{
    unsigned rounds = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 10) : 300;
    int racing = 0;

    for (unsigned r = 0; r < rounds; r++) {
        if (run_round(r, &racing) != 0)
            return 1;
    }
    printf("ok: %u rounds, %d snapshots took bits while markers ran\n", rounds, racing);
    return 0;
}
