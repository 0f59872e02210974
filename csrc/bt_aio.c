/* bt_aio.c: several reads or writes in flight, served by a small pthread pool.
 *
 * Why threads and not io_uring or libaio: the engine must run on the kernel lab's 6.1 kernel
 * and the 6.18 host alike, in containers where io_uring_setup may be refused, and a blocking
 * pread per worker thread reaches the same throughput for 1 MiB requests (the per-request
 * thread hand-off costs microseconds against a millisecond transfer).
 *
 * State, all under one mutex:
 *   queue  - a ring of submitted requests no worker has picked up yet;
 *   done   - a ring of completions not yet reaped;
 *   outstanding - submitted and not yet reaped (queued + running + done).
 * outstanding never exceeds capacity, so neither ring can overflow: submit returns -EAGAIN
 * rather than grow anything. A request's life: submit -> queue -> a worker takes it (running,
 * on no list; the worker holds it by value) -> done -> reap hands it to the caller.
 *
 * Cancel moves queued requests straight to done with -ECANCELED; running ones cannot be
 * interrupted (a pread of 1 MiB is short) and complete normally. So a caller that wants to stop
 * cancels, then reaps until outstanding is 0, and then owns all of its buffers again. Destroy
 * does the same internally and joins the workers, so no worker ever touches a buffer after
 * destroy returns.
 *
 * A request may also ask for the digest of its buffer (bt_aio_submit_digest): the worker hashes
 * it after the transfer, so verification costs the caller's thread nothing (bt_digest.c).
 *
 * Waiting (bt_aio_reap) happens here in C; the cffi binding releases the GIL around the call.
 * Workers block all signals so that signals keep going to the Python main thread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <time.h>

#include "bt_core.h"

struct bt_aio_req {
    int fd;
    int op;
    void *buf;
    size_t len;
    uint64_t off;
    uint64_t tag;
    uint8_t *digest;            /* NULL: no digest wanted */
    size_t digest_len;
};

struct bt_aio {
    pthread_mutex_t lock;
    pthread_cond_t work_cv;     /* signalled when queue gains a request or on shutdown */
    pthread_cond_t done_cv;     /* signalled when done gains a completion */
    uint32_t capacity;
    struct bt_aio_req *queue;   /* ring of capacity entries */
    uint32_t q_head, q_count;
    struct bt_completion *done; /* ring of capacity entries */
    uint32_t d_head, d_count;
    uint32_t outstanding;
    int shutdown;
    uint32_t nthreads;          /* workers actually started */
    pthread_t *threads;
};

static void bt_aio_push_done(struct bt_aio *aio, uint64_t tag, int64_t result)
{
    struct bt_completion *c = &aio->done[(aio->d_head + aio->d_count) % aio->capacity];

    c->tag = tag;
    c->result = result;
    aio->d_count++;
}

static void *bt_aio_worker(void *arg)
{
    struct bt_aio *aio = arg;

    pthread_mutex_lock(&aio->lock);
    for (;;) {
        struct bt_aio_req req;
        int64_t result;

        while (aio->q_count == 0 && !aio->shutdown)
            pthread_cond_wait(&aio->work_cv, &aio->lock);
        if (aio->q_count == 0)
            break; /* shutdown and nothing left to run */
        req = aio->queue[aio->q_head];
        aio->q_head = (aio->q_head + 1) % aio->capacity;
        aio->q_count--;
        pthread_mutex_unlock(&aio->lock);

        if (req.op == BT_OP_READ)
            result = bt_pread_full(req.fd, req.buf, req.len, req.off);
        else
            result = bt_pwrite_full(req.fd, req.buf, req.len, req.off);
        if (req.digest != NULL && result >= 0) {
            size_t n = req.digest_len;

            if (req.op == BT_OP_READ && (uint64_t)result < n)
                n = (size_t)result;
            bt_digest128(req.buf, n, req.digest);
        }

        pthread_mutex_lock(&aio->lock);
        bt_aio_push_done(aio, req.tag, result);
        pthread_cond_broadcast(&aio->done_cv);
    }
    pthread_mutex_unlock(&aio->lock);
    return NULL;
}

static void bt_aio_release(struct bt_aio *aio)
{
    pthread_cond_destroy(&aio->done_cv);
    pthread_cond_destroy(&aio->work_cv);
    pthread_mutex_destroy(&aio->lock);
    free(aio->threads);
    free(aio->done);
    free(aio->queue);
    free(aio);
}

int bt_aio_create(struct bt_aio **out, uint32_t nthreads, uint32_t capacity)
{
    struct bt_aio *aio;
    pthread_condattr_t cattr;
    pthread_attr_t tattr;
    sigset_t all, old;
    int rc;

    *out = NULL;
    if (nthreads == 0 || capacity == 0)
        return -EINVAL;
    aio = calloc(1, sizeof(*aio));
    if (aio == NULL)
        return -ENOMEM;
    aio->capacity = capacity;
    aio->queue = calloc(capacity, sizeof(*aio->queue));
    aio->done = calloc(capacity, sizeof(*aio->done));
    aio->threads = calloc(nthreads, sizeof(*aio->threads));
    if (aio->queue == NULL || aio->done == NULL || aio->threads == NULL) {
        free(aio->threads);
        free(aio->done);
        free(aio->queue);
        free(aio);
        return -ENOMEM;
    }
    pthread_mutex_init(&aio->lock, NULL);
    pthread_condattr_init(&cattr);
    pthread_condattr_setclock(&cattr, CLOCK_MONOTONIC); /* reap timeouts ignore clock steps */
    pthread_cond_init(&aio->done_cv, &cattr);
    pthread_condattr_destroy(&cattr);
    pthread_cond_init(&aio->work_cv, NULL);

    /* Workers need little stack: they only loop over pread/pwrite. */
    pthread_attr_init(&tattr);
    pthread_attr_setstacksize(&tattr, 256 * 1024);
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old); /* new threads inherit the blocked mask */
    rc = 0;
    for (uint32_t i = 0; i < nthreads; i++) {
        rc = pthread_create(&aio->threads[i], &tattr, bt_aio_worker, aio);
        if (rc != 0)
            break;
        aio->nthreads++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_attr_destroy(&tattr);

    if (aio->nthreads == 0) {
        bt_aio_release(aio);
        return -rc;
    }
    /* Fewer workers than asked (thread limit) still make a working engine, just slower. */
    *out = aio;
    return 0;
}

int bt_aio_submit(struct bt_aio *aio, int fd, int op, void *buf, size_t len, uint64_t off,
                  uint64_t tag)
{
    return bt_aio_submit_digest(aio, fd, op, buf, len, off, tag, NULL, 0);
}

int bt_aio_submit_digest(struct bt_aio *aio, int fd, int op, void *buf, size_t len, uint64_t off,
                         uint64_t tag, uint8_t *digest, size_t digest_len)
{
    struct bt_aio_req *req;

    if (op != BT_OP_READ && op != BT_OP_WRITE)
        return -EINVAL;
    if (digest != NULL && op == BT_OP_WRITE && digest_len < len)
        return -EINVAL;
    if (buf == NULL && len > 0)
        return -EFAULT;
    pthread_mutex_lock(&aio->lock);
    if (aio->shutdown) {
        pthread_mutex_unlock(&aio->lock);
        return -ESHUTDOWN;
    }
    if (aio->outstanding >= aio->capacity) {
        pthread_mutex_unlock(&aio->lock);
        return -EAGAIN;
    }
    req = &aio->queue[(aio->q_head + aio->q_count) % aio->capacity];
    req->fd = fd;
    req->op = op;
    req->buf = buf;
    req->len = len;
    req->off = off;
    req->tag = tag;
    req->digest = digest;
    req->digest_len = digest_len;
    aio->q_count++;
    aio->outstanding++;
    pthread_cond_signal(&aio->work_cv);
    pthread_mutex_unlock(&aio->lock);
    return 0;
}

static void bt_deadline(struct timespec *ts, int timeout_ms)
{
    clock_gettime(CLOCK_MONOTONIC, ts);
    ts->tv_sec += timeout_ms / 1000;
    ts->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

int bt_aio_reap(struct bt_aio *aio, struct bt_completion *out, uint32_t max,
                uint32_t min_complete, int timeout_ms)
{
    struct timespec deadline;
    uint32_t n = 0;

    if (timeout_ms > 0)
        bt_deadline(&deadline, timeout_ms);
    pthread_mutex_lock(&aio->lock);
    if (min_complete > max)
        min_complete = max;
    for (;;) {
        /* Never wait for more completions than can still arrive. */
        uint32_t want = min_complete < aio->outstanding ? min_complete : aio->outstanding;

        if (aio->d_count >= want)
            break;
        if (timeout_ms == 0)
            break;
        if (timeout_ms < 0) {
            pthread_cond_wait(&aio->done_cv, &aio->lock);
        } else if (pthread_cond_timedwait(&aio->done_cv, &aio->lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    while (n < max && aio->d_count > 0) {
        out[n++] = aio->done[aio->d_head];
        aio->d_head = (aio->d_head + 1) % aio->capacity;
        aio->d_count--;
        aio->outstanding--;
    }
    pthread_mutex_unlock(&aio->lock);
    return (int)n;
}

/* Called with the lock held. */
static int bt_aio_cancel_locked(struct bt_aio *aio)
{
    int n = 0;

    while (aio->q_count > 0) {
        struct bt_aio_req *req = &aio->queue[aio->q_head];

        aio->q_head = (aio->q_head + 1) % aio->capacity;
        aio->q_count--;
        bt_aio_push_done(aio, req->tag, -ECANCELED);
        n++;
    }
    if (n > 0)
        pthread_cond_broadcast(&aio->done_cv);
    return n;
}

int bt_aio_cancel(struct bt_aio *aio)
{
    int n;

    pthread_mutex_lock(&aio->lock);
    n = bt_aio_cancel_locked(aio);
    pthread_mutex_unlock(&aio->lock);
    return n;
}

uint32_t bt_aio_outstanding(struct bt_aio *aio)
{
    uint32_t n;

    pthread_mutex_lock(&aio->lock);
    n = aio->outstanding;
    pthread_mutex_unlock(&aio->lock);
    return n;
}

void bt_aio_destroy(struct bt_aio *aio)
{
    if (aio == NULL)
        return;
    pthread_mutex_lock(&aio->lock);
    aio->shutdown = 1;
    bt_aio_cancel_locked(aio);
    pthread_cond_broadcast(&aio->work_cv);
    pthread_mutex_unlock(&aio->lock);
    /* Each worker finishes the request it is running, if any, then sees shutdown. */
    for (uint32_t i = 0; i < aio->nthreads; i++)
        pthread_join(aio->threads[i], NULL);
    bt_aio_release(aio);
}
