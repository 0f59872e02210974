/* bt_cdef.h: the declarations of blocktrack's C core, shared by C and by cffi.
 *
 * csrc/build_ffi.py reads this file verbatim into ffi.cdef(), so it holds only what cffi's
 * parser accepts: no #include, no #define, no inline code. C sources include bt_core.h, which
 * pulls in the system headers these declarations need and then this file.
 *
 * Conventions: every function returns 0 or a non-negative count on success and -errno on
 * failure; handles are owned by the caller (a struct the caller allocates and passes to _init,
 * or an opaque pointer from _create that the caller hands back to _destroy). No globals.
 */

/* ---- page-aligned buffer pool (bt_bufpool.c) ---- */

struct bt_bufpool {
    void *base;          /* nbufs * buf_size bytes, page aligned; NULL until init */
    size_t buf_size;     /* bytes per buffer, a multiple of the page size */
    uint32_t nbufs;
    size_t map_len;      /* bytes mapped at base */
};

/* Map nbufs buffers of at least buf_size bytes each (rounded up to the page size). */
int bt_bufpool_init(struct bt_bufpool *pool, size_t buf_size, uint32_t nbufs);
/* Address of buffer i, or NULL when i is out of range. */
void *bt_bufpool_buf(const struct bt_bufpool *pool, uint32_t i);
/* Unmap; safe to call twice. */
void bt_bufpool_free(struct bt_bufpool *pool);

/* ---- synchronous whole-range I/O (bt_io.c) ---- */

/* Read or write len bytes at off, looping over short transfers and retrying EINTR/EAGAIN.
 * Returns the bytes transferred: less than len only when a read met end of file (or a write
 * made no progress), or -errno when a call failed. */
int64_t bt_pread_full(int fd, void *buf, size_t len, uint64_t off);
int64_t bt_pwrite_full(int fd, const void *buf, size_t len, uint64_t off);
int bt_fdatasync(int fd);

/* ---- asynchronous I/O engine: a small pthread pool (bt_aio.c) ---- */

enum bt_op { BT_OP_READ = 0, BT_OP_WRITE = 1 };

struct bt_completion {
    uint64_t tag;        /* the caller's tag from bt_aio_submit */
    int64_t result;      /* bytes transferred, or -errno; -ECANCELED when cancelled */
};

struct bt_aio;

/* Start nthreads workers; at most capacity requests may be submitted and not yet reaped. */
int bt_aio_create(struct bt_aio **out, uint32_t nthreads, uint32_t capacity);
/* Queue one request; -EAGAIN when capacity requests are outstanding, -EINVAL for a bad op. */
int bt_aio_submit(struct bt_aio *aio, int fd, int op, void *buf, size_t len, uint64_t off,
                  uint64_t tag);
/* The same, and when the transfer succeeds the worker also stores in digest (16 bytes, caller
 * owned, untouched otherwise) the bt_digest128 of the first digest_len bytes of buf: of a read,
 * at most the bytes it read; of a write, digest_len bytes whatever part of them this request
 * writes (the caller may write an unaligned tail of the same buffer itself). */
int bt_aio_submit_digest(struct bt_aio *aio, int fd, int op, void *buf, size_t len, uint64_t off,
                         uint64_t tag, uint8_t *digest, size_t digest_len);
/* Wait (timeout_ms < 0: forever) until at least min_complete completions are ready (fewer if
 * fewer are outstanding), then move up to max of them into out. Returns how many were moved. */
int bt_aio_reap(struct bt_aio *aio, struct bt_completion *out, uint32_t max,
                uint32_t min_complete, int timeout_ms);
/* Turn every queued request that no worker has started into a -ECANCELED completion (still to
 * be reaped). Returns how many were cancelled. Requests already running finish normally. */
int bt_aio_cancel(struct bt_aio *aio);
/* Requests submitted and not yet reaped. */
uint32_t bt_aio_outstanding(struct bt_aio *aio);
/* Cancel what is queued, wait for running requests, join the workers, free. NULL is a no-op. */
void bt_aio_destroy(struct bt_aio *aio);

/* ---- chunk digests (bt_digest.c) ---- */

/* XXH3-128 of len bytes at buf, its 16 bytes in canonical (big-endian) order, into out. */
int bt_digest128(const void *buf, size_t len, uint8_t *out);

/* ---- zero detection (bt_zero.c) ---- */

/* 1 when all len bytes are zero, else 0. */
int bt_is_zero(const void *buf, size_t len);

/* ---- chunk bitmap, safe for concurrent markers (bt_bitmap.c) ---- */

struct bt_bitmap {
    uint64_t *words;     /* bit i is bit (i % 64) of words[i / 64]; bits past nbits stay 0 */
    uint64_t nbits;
    uint64_t nwords;
};

int bt_bitmap_init(struct bt_bitmap *bm, uint64_t nbits);
void bt_bitmap_free(struct bt_bitmap *bm);
/* -ERANGE when [first, first + count) is not inside the map. */
int bt_bitmap_set_range(struct bt_bitmap *bm, uint64_t first, uint64_t count);
int bt_bitmap_clear_range(struct bt_bitmap *bm, uint64_t first, uint64_t count);
/* 1 or 0, -ERANGE past the end. */
int bt_bitmap_test(const struct bt_bitmap *bm, uint64_t index);
/* First set (or clear) bit at or after start, or -ENOENT when there is none. */
int64_t bt_bitmap_next_set(const struct bt_bitmap *bm, uint64_t start);
int64_t bt_bitmap_next_clear(const struct bt_bitmap *bm, uint64_t start);
/* Set bits at or after start, ascending, into out (at most max); returns how many. */
int64_t bt_bitmap_collect(const struct bt_bitmap *bm, uint64_t start, uint64_t *out,
                          uint64_t max);
int64_t bt_bitmap_count(const struct bt_bitmap *bm);
/* Move every set bit of src into dst (dst |= src; src = 0), one atomic exchange per word, so a
 * bit set concurrently lands in exactly one of them. Returns the number of bits moved. */
int64_t bt_bitmap_snapshot_clear(struct bt_bitmap *src, struct bt_bitmap *dst);
/* Raw words for save/load; nwords must equal bm->nwords. copy_in rejects (-EINVAL) words
 * with bits set past nbits. */
int bt_bitmap_copy_out(const struct bt_bitmap *bm, uint64_t *words, uint64_t nwords);
int bt_bitmap_copy_in(struct bt_bitmap *bm, const uint64_t *words, uint64_t nwords);
