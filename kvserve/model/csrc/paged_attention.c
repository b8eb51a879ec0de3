/* Paged attention for CPUs, fused: reads K/V straight from the paged cache through the block tables.
 *
 * Every query row (token t, query head) is computed from its own inputs only: its query, its position p
 * and the keys/values at positions 0..p of its sequence, taken in 16-key blocks 0..p/16 in order. Scores
 * are fused multiply-adds over head_dim in order; the row max is exact; exp(score - max) is a fixed
 * polynomial; the exp sums are kept in 16 lanes (lane = key mod 16), added block after block and folded in
 * lane order at the end; P.V is a fused multiply-add per key, in key order. Keys past p inside the row's last
 * block add exact zeros. Nothing depends on the other rows in the call, on how tokens are tiled, on the
 * thread that runs them, or on where the blocks live, so a row gets the same bits in any batch, chunking or
 * cache state (tests/unit/test_native_attention.py, tests/model/test_golden.py).
 *
 * Shared prefixes ("cascade" attention): decodes and short suffixes whose block tables point at the same cache
 * blocks for their first keys (one system prompt or document, found by comparing the tables: same block id =
 * same content) are attended by one work item per KV head, or a few when the threads need more items: each
 * shared key and value block is loaded (and transposed) once for the rows of every sequence in the item, and
 * each sequence's own later blocks are loaded from its own table. A row still meets its key blocks in the
 * same order, two at a time in pass 1 and one at a time in pass 2, with the same instructions, so sharing a
 * load changes no bit of any row.
 *
 * float32 caches (and bf16 caches on CPUs without AVX512-BF16) convert K/V to float32 and use float32
 * fused multiply-adds. bf16 caches on AVX512-BF16 CPUs use VDPBF16PS: q.k from the bf16 query and keys
 * (exact products, float32 sums, times the scale), and P.V from the weights rounded to bf16 (the exp sums
 * stay float32), as torch's own bf16 flash-attention kernel does; every row, alone or in a group, runs the
 * same instruction sequence.
 *
 * Built at first use by kvserve/model/native.py (gcc -O3 -march=native -ffp-contract=off): with contraction
 * off, every fused multiply-add is explicit (fmaf or an intrinsic), so vector and scalar code agree.
 */
#include <math.h>
#include <stdint.h>
#include <limits.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#include <stdlib.h>
#include <string.h>

#include "kvmath.h"

#define KB 16
#define MAX_GROUP 16 /* tiles per item at most when sequences share key blocks */
#define MAX_ROWS 96  /* query rows per item at most (their scores and accumulators are the item's scratch) */

/* A 32-bit word (a pair of bf16 values) from memory of another declared type, without aliasing trouble. */
static inline int32_t ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Key blocks asked for ahead of use: a sequence's blocks sit anywhere in the pool, where the hardware
 * prefetcher cannot follow them. While an item computes, it asks for the first FETCH_AHEAD blocks of keys and
 * values of the item its thread probably takes next, a few lines per block step; its own later blocks it asks
 * for FETCH_AHEAD blocks ahead; an item nobody asked for asks for its first blocks at once. Measured, batch-32
 * decode at 96 keys (KV read from memory), 30 layers' attention in the engine's step: bf16 6.1-6.5 -> 2.7-3.2
 * ms, float32 8.2-9.5 -> 3.9-5.7 ms (the fused layer's section clocks; tokens and logprobs unchanged). */
#define FETCH_AHEAD 8

/* Where key (or value) k of one head (ofs: the head's first element) sits in the cache. */
static inline const char *key_row(const void *kv, int e, int64_t ofs, const int32_t *table, int bs, int hd,
                                  int64_t k) {
    return (const char *)kv + (ofs + ((int64_t)table[k / bs] * bs + k % bs) * hd) * e;
}

/* Asks for block b (KB keys) of one head of K or V into the cache, 64 bytes at a time, up to key maxpos (the
 * block table has no entries past it). A prefetch changes no number. */
static inline void prefetch_block(const void *kv, int e, int64_t ofs, const int32_t *table, int bs, int hd, int b,
                                  int64_t maxpos) {
    const int64_t row = (int64_t)hd * e, k0 = (int64_t)b * KB;
    if (k0 > maxpos) return;
    if (bs % KB == 0) { /* the block's keys are contiguous, in one cache block */
        const char *src = key_row(kv, e, ofs, table, bs, hd, k0);
        for (int64_t o = 0; o < KB * row; o += 64) prefetch_line(src + o);
        return;
    }
    for (int64_t k = k0; k < k0 + KB && k <= maxpos; ++k) {
        const char *src = key_row(kv, e, ofs, table, bs, hd, k);
        for (int64_t o = 0; o < row; o += 64) prefetch_line(src + o);
    }
}

typedef struct {
    int32_t row_start; /* first token of the tile in the flat batch */
    int32_t ntok;      /* tokens in the tile */
    int32_t seq;       /* row of the block table */
    int32_t kv_head;
    int32_t member0;   /* its members (see Member) are members[member0 .. member0 + nmembers); the first is the */
    int32_t nmembers;  /* tile above, the leader */
} Item;

/* One tile of a sequence attended together with others that read the same leading KV blocks (a shared system
 * prompt or document): for key blocks b < shared (16-key blocks, an even count) its block table points at the
 * same cache blocks as its item's leader, so those blocks are loaded once, from the leader's table, for the
 * rows of every member that shares them; later blocks each member loads from its own table. */
typedef struct {
    int32_t row_start, ntok, seq;
    int32_t shared; /* the leader: all of its blocks */
} Member;

/* Asks for the first FETCH_AHEAD key blocks of an item's K (part 0) or V (part 1) head. */
static void prefetch_item(const Item *it, int part, const void *kv, int e, const int32_t *tables, int max_blocks,
                          const int64_t *pos, int KVH, int64_t nb, int bs, int hd) {
    const int64_t ofs = ((int64_t)part * KVH + it->kv_head) * nb * bs * hd;
    const int32_t *table = tables + (size_t)it->seq * max_blocks;
    const int64_t maxpos = pos[it->row_start + it->ntok - 1];
    for (int b = 0; b < FETCH_AHEAD; ++b) prefetch_block(kv, e, ofs, table, bs, hd, b, maxpos);
}

/* The next item's first blocks (keys, then values), asked for a few lines at a time while this item computes:
 * a burst of hundreds of prefetches would find no free miss buffers. Needs contiguous blocks (bs % KB == 0). */
typedef struct {
    const char *base[2 * FETCH_AHEAD];
    int n, lines, line; /* blocks, 64-byte lines per block, next line over all blocks */
} Fetcher;

static void fetcher_init(Fetcher *f, const Item *it, const void *kv, int e, const int32_t *tables, int max_blocks,
                         const int64_t *pos, int KVH, int64_t nb, int bs, int hd) {
    f->n = f->line = 0;
    f->lines = (int)((int64_t)KB * hd * e / 64);
    if (it == NULL || bs % KB) return;
    const int32_t *table = tables + (size_t)it->seq * max_blocks;
    const int nblk = (int)(pos[it->row_start + it->ntok - 1] / KB) + 1;
    for (int part = 0; part < 2; ++part) {
        const int64_t ofs = ((int64_t)part * KVH + it->kv_head) * nb * bs * hd;
        for (int b = 0; b < FETCH_AHEAD && b < nblk; ++b) f->base[f->n++] = key_row(kv, e, ofs, table, bs, hd, b * KB);
    }
}

static inline void fetch_lines(Fetcher *f, int count) {
    for (; count > 0 && f->line < f->n * f->lines; --count, ++f->line)
        prefetch_line(f->base[f->line / f->lines] + (int64_t)(f->line % f->lines) * 64);
}

#ifdef __AVX512F__
/* r[j] (16 rows of 16 floats) transposed in registers: afterwards r[c] holds column c. */
static inline void transpose16(__m512 r[16]) {
    __m512 t[16], u[16];
    for (int k = 0; k < 8; ++k) {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    for (int k = 0; k < 4; ++k) {
        u[4 * k] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
        u[4 * k + 1] = _mm512_shuffle_ps(t[4 * k], t[4 * k + 2], 0xEE);
        u[4 * k + 2] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
        u[4 * k + 3] = _mm512_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xEE);
    }
    for (int m = 0; m < 4; ++m) {
        __m512 v0 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0x44), v1 = _mm512_shuffle_f32x4(u[m], u[4 + m], 0xEE);
        __m512 w0 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0x44);
        __m512 w1 = _mm512_shuffle_f32x4(u[8 + m], u[12 + m], 0xEE);
        r[m] = _mm512_shuffle_f32x4(v0, w0, 0x88);
        r[4 + m] = _mm512_shuffle_f32x4(v0, w0, 0xDD);
        r[8 + m] = _mm512_shuffle_f32x4(v1, w1, 0x88);
        r[12 + m] = _mm512_shuffle_f32x4(v1, w1, 0xDD);
    }
}

/* load_block's transposed float32 case, 16 dims at a time through registers (hd % 16 == 0): copies only. */
static void load_kblock_f32(float *dst, int ld, const float *kv, int64_t ofs, const int32_t *table, int bs, int hd,
                            int b, int64_t maxpos) {
    const float *src[KB];
    for (int j = 0; j < KB; ++j) {
        int64_t k = (int64_t)b * KB + j;
        src[j] = k > maxpos ? NULL : kv + ofs + ((int64_t)table[k / bs] * bs + k % bs) * hd;
    }
    for (int d0 = 0; d0 < hd; d0 += 16) {
        __m512 r[16];
        for (int j = 0; j < KB; ++j) r[j] = src[j] ? _mm512_loadu_ps(src[j] + d0) : _mm512_setzero_ps();
        transpose16(r);
        for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (int64_t)(d0 + c) * ld, r[c]);
    }
}
#endif

/* K block b (16 keys) of one head transposed into dst[d * ld + j], or V block b row-major into
 * dst[j * hd + d]; keys past maxpos are zeros. */
static void load_block(float *dst, int transposed, int ld, const void *kv, int is_bf16, int64_t ofs,
                       const int32_t *table, int bs, int hd, int b, int64_t maxpos) {
#ifdef __AVX512F__
    if (transposed && !is_bf16 && hd % 16 == 0) {
        load_kblock_f32(dst, ld, (const float *)kv, ofs, table, bs, hd, b, maxpos);
        return;
    }
#endif
    for (int j = 0; j < KB; ++j) {
        int64_t k = (int64_t)b * KB + j;
        if (k > maxpos) {
            for (int d = 0; d < hd; ++d) dst[transposed ? d * ld + j : j * hd + d] = 0.0f;
            continue;
        }
        int64_t slot = (int64_t)table[k / bs] * bs + k % bs;
        if (is_bf16) {
            const uint16_t *src = (const uint16_t *)kv + ofs + slot * hd;
            if (transposed)
                for (int d = 0; d < hd; ++d) dst[d * ld + j] = bf16_to_f32(src[d]);
            else
                for (int d = 0; d < hd; ++d) dst[j * hd + d] = bf16_to_f32(src[d]);
        } else {
            const float *src = (const float *)kv + ofs + slot * hd;
            if (transposed)
                for (int d = 0; d < hd; ++d) dst[d * ld + j] = src[d];
            else
                memcpy(dst + j * hd, src, sizeof(float) * hd);
        }
    }
}

/* Masked store of one row's 16 lanes of one block, and its lane maxima: lanes j <= lim are visible. */
static inline void store_lanes(const float *a, int64_t lim, float *s, float *m) {
    for (int j = 0; j < KB; ++j) {
        float v = j <= lim ? a[j] : -INFINITY;
        s[j] = v;
        m[j] = v > m[j] ? v : m[j];
    }
}

#ifdef __AVX512F__
/* R rows (a compile-time constant at each call site) of qk_pair, vectorised over the 16 keys of a block. */
static inline __attribute__((always_inline)) void qk_rows(const int R, const float *const *qrow, float *const *s0,
                                                           float *const *s1, float *const *mrow, const int64_t *lim,
                                                           const float *kt, int hd) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 a[8][2];
    for (int u = 0; u < R; ++u) a[u][0] = a[u][1] = _mm512_setzero_ps();
    for (int d = 0; d < hd; ++d) {
        __m512 k0 = _mm512_loadu_ps(kt + d * 2 * KB), k1 = _mm512_loadu_ps(kt + d * 2 * KB + KB);
        for (int u = 0; u < R; ++u) {
            __m512 w = _mm512_set1_ps(qrow[u][d]);
            a[u][0] = _mm512_fmadd_ps(w, k0, a[u][0]);
            a[u][1] = _mm512_fmadd_ps(w, k1, a[u][1]);
        }
    }
    for (int u = 0; u < R; ++u) {
        const int64_t l = lim[u];
        __m512 m = _mm512_loadu_ps(mrow[u]);
        __mmask16 vis = _mm512_cmple_epi32_mask(iota, _mm512_set1_epi32((int32_t)(l < KB ? l : KB)));
        __m512 v = _mm512_mask_blend_ps(vis, ninf, a[u][0]);
        _mm512_storeu_ps(s0[u], v);
        m = _mm512_max_ps(m, v);
        if (l >= KB) {
            vis = _mm512_cmple_epi32_mask(iota, _mm512_set1_epi32((int32_t)(l - KB < KB ? l - KB : KB)));
            v = _mm512_mask_blend_ps(vis, ninf, a[u][1]);
            _mm512_storeu_ps(s1[u], v);
            m = _mm512_max_ps(m, v);
        }
        _mm512_storeu_ps(mrow[u], m);
    }
}
#endif

/* Scores of rows i < nr against two key blocks (kt: d * 32 + j, j < 16 the first block, the rest the second):
 * a lane is sum_d q_i[d] * k[d] in fused multiply-adds in d order, or -inf past the row's last visible key
 * (lim[i]: first-block lanes j <= lim[i] are visible, second-block lanes j <= lim[i] - 16). A row's second
 * block is stored only when it reaches it (lim[i] >= 16); s1 may be NULL-free garbage otherwise. Rows go 8 at
 * a time, then the rest together (a decode step's handful of query heads): the same operations per lane. */
static void qk_pair(const float *const *qrow, float *const *s0, float *const *s1, float *const *mrow,
                    const int64_t *lim, int nr, const float *kt, int hd) {
    int i = 0;
#ifdef __AVX512F__
    for (; i + 8 <= nr; i += 8) qk_rows(8, qrow + i, s0 + i, s1 + i, mrow + i, lim + i, kt, hd);
#define QK_REST(R) qk_rows(R, qrow + i, s0 + i, s1 + i, mrow + i, lim + i, kt, hd)
    KVSERVE_ROWS8(nr - i, QK_REST)
#undef QK_REST
    i = nr;
#endif
    for (; i < nr; ++i) { /* without AVX-512: the same fused multiply-adds in the same order */
        float a0[KB] = {0}, a1[KB] = {0};
        const float *qi = qrow[i];
        for (int d = 0; d < hd; ++d) {
            for (int j = 0; j < KB; ++j) a0[j] = fmaf(qi[d], kt[d * 2 * KB + j], a0[j]);
            for (int j = 0; j < KB; ++j) a1[j] = fmaf(qi[d], kt[d * 2 * KB + KB + j], a1[j]);
        }
        store_lanes(a0, lim[i], s0[i], mrow[i]);
        if (lim[i] >= KB) store_lanes(a1, lim[i] - KB, s1[i], mrow[i]);
    }
}

#ifdef __AVX512F__
/* R rows (a compile-time constant at each call site) of pv_block: 64 dims at a time, then the rest. */
static inline __attribute__((always_inline)) void pv_rows(const int R, float *const *e, float *const *o,
                                                           const float *vb, int hd) {
    int c = 0;
    for (; c + 64 <= hd; c += 64) { /* R rows x 64 dims: up to 16 accumulators */
        __m512 x[4][4];
        for (int u = 0; u < R; ++u)
            for (int h = 0; h < 4; ++h) x[u][h] = _mm512_loadu_ps(o[u] + c + 16 * h);
        for (int j = 0; j < KB; ++j) {
            const float *v = vb + j * hd + c;
            __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
                   v3 = _mm512_loadu_ps(v + 48);
            for (int u = 0; u < R; ++u) {
                __m512 w = _mm512_set1_ps(e[u][j]);
                x[u][0] = _mm512_fmadd_ps(w, v0, x[u][0]);
                x[u][1] = _mm512_fmadd_ps(w, v1, x[u][1]);
                x[u][2] = _mm512_fmadd_ps(w, v2, x[u][2]);
                x[u][3] = _mm512_fmadd_ps(w, v3, x[u][3]);
            }
        }
        for (int u = 0; u < R; ++u)
            for (int h = 0; h < 4; ++h) _mm512_storeu_ps(o[u] + c + 16 * h, x[u][h]);
    }
    for (int u = 0; u < R; ++u) { /* dims past the last multiple of 64 */
        for (int j = 0; j < KB; ++j) {
            const float w = e[u][j];
            for (int d = c; d < hd; ++d) o[u][d] = fmaf(w, vb[j * hd + d], o[u][d]);
        }
    }
}
#endif

/* o_i[d] += sum_j e_i[j] * vb[j * hd + d], fused multiply-adds in j order, for rows i < nr: 4 rows at a time,
 * then the rest together; the same operations per element. */
static void pv_block(float *const *e, float *const *o, int nr, const float *vb, int hd) {
    int i = 0;
#ifdef __AVX512F__
    for (; i + 4 <= nr; i += 4) pv_rows(4, e + i, o + i, vb, hd);
#define PV_REST(R) pv_rows(R, e + i, o + i, vb, hd)
    KVSERVE_ROWS3(nr - i, PV_REST)
#undef PV_REST
    i = nr;
#endif
    for (; i < nr; ++i) { /* without AVX-512: the same fused multiply-adds in the same order */
        float *oi = o[i];
        for (int j = 0; j < KB; ++j) {
            const float w = e[i][j];
            for (int d = 0; d < hd; ++d) oi[d] = fmaf(w, vb[j * hd + d], oi[d]);
        }
    }
}

#ifdef __AVX512BF16__
/* bfloat16 caches on CPUs with AVX512-BF16: q.k with VDPBF16PS, which multiplies bf16 pairs exactly and adds
 * them to float32 lanes. K block b's 32-bit (d, d+1) pairs transposed into dst[p * 32 + col0 + j]. */
static void load_kpairs(uint32_t *dst, int col0, const void *kv, int64_t ofs, const int32_t *table, int bs, int hd,
                        int b, int64_t maxpos) {
    const int hp = hd / 2;
    if (hp % 16 == 0) { /* 16 pairs at a time through registers (transpose16 moves 32-bit words as they are) */
        const uint16_t *src[KB];
        for (int j = 0; j < KB; ++j) {
            int64_t k = (int64_t)b * KB + j;
            src[j] = k > maxpos ? NULL : (const uint16_t *)kv + ofs + ((int64_t)table[k / bs] * bs + k % bs) * hd;
        }
        for (int p0 = 0; p0 < hp; p0 += 16) {
            __m512 r[16];
            for (int j = 0; j < KB; ++j) r[j] = src[j] ? _mm512_loadu_ps(src[j] + 2 * p0) : _mm512_setzero_ps();
            transpose16(r);
            for (int c = 0; c < 16; ++c) _mm512_storeu_ps(dst + (p0 + c) * 2 * KB + col0, r[c]);
        }
        return;
    }
    for (int j = 0; j < KB; ++j) {
        int64_t k = (int64_t)b * KB + j;
        if (k > maxpos) {
            for (int p = 0; p < hp; ++p) dst[p * 2 * KB + col0 + j] = 0;
            continue;
        }
        int64_t slot = (int64_t)table[k / bs] * bs + k % bs;
        const uint16_t *src = (const uint16_t *)kv + ofs + slot * hd;
        for (int p = 0; p < hp; ++p) dst[p * 2 * KB + col0 + j] = (uint32_t)ld32(src + 2 * p);
    }
}

static inline void store_scaled(__m512 a, float scale, int64_t lim, float *s, float *m) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __mmask16 vis = _mm512_cmple_epi32_mask(iota, _mm512_set1_epi32((int32_t)(lim < KB ? lim : KB)));
    __m512 v = _mm512_mask_blend_ps(vis, _mm512_set1_ps(-INFINITY), _mm512_mul_ps(a, _mm512_set1_ps(scale)));
    _mm512_storeu_ps(s, v);
    _mm512_storeu_ps(m, _mm512_max_ps(_mm512_loadu_ps(m), v));
}

/* R rows (a compile-time constant at each call site) of qk_pair_bf16. */
static inline __attribute__((always_inline)) void qk_rows_bf16(const int R, const uint16_t *const *qrow,
                                                                float *const *s0, float *const *s1,
                                                                float *const *mrow, const int64_t *lim,
                                                                const uint32_t *ktp, int hp, float scale) {
    __m512 a[8][2];
    for (int u = 0; u < R; ++u) a[u][0] = a[u][1] = _mm512_setzero_ps();
    for (int p = 0; p < hp; ++p) {
        __m512bh k0 = (__m512bh)_mm512_loadu_si512(ktp + p * 2 * KB);
        __m512bh k1 = (__m512bh)_mm512_loadu_si512(ktp + p * 2 * KB + KB);
        for (int u = 0; u < R; ++u) {
            __m512bh w = (__m512bh)_mm512_set1_epi32(ld32(qrow[u] + 2 * p));
            a[u][0] = _mm512_dpbf16_ps(a[u][0], w, k0);
            a[u][1] = _mm512_dpbf16_ps(a[u][1], w, k1);
        }
    }
    for (int u = 0; u < R; ++u) {
        store_scaled(a[u][0], scale, lim[u], s0[u], mrow[u]);
        if (lim[u] >= KB) store_scaled(a[u][1], scale, lim[u] - KB, s1[u], mrow[u]);
    }
}

/* As qk_pair, from bf16 queries (qrow: 32-bit pairs) and ktp from load_kpairs; scores = (q . k) * scale with
 * VDPBF16PS over pairs of dims. 8 rows at a time, then the rest together: every row, in any group, takes the
 * same instruction sequence, so the same bits. */
static void qk_pair_bf16(const uint16_t *const *qrow, float *const *s0, float *const *s1, float *const *mrow,
                         const int64_t *lim, int nr, const uint32_t *ktp, int hd, float scale) {
    const int hp = hd / 2;
    int i = 0;
    for (; i + 8 <= nr; i += 8) qk_rows_bf16(8, qrow + i, s0 + i, s1 + i, mrow + i, lim + i, ktp, hp, scale);
#define QK_REST(R) qk_rows_bf16(R, qrow + i, s0 + i, s1 + i, mrow + i, lim + i, ktp, hp, scale)
    KVSERVE_ROWS8(nr - i, QK_REST)
#undef QK_REST
}
/* V block b as (key pair, dim) 32-bit words: dst[p * hd + d] = (v[2p][d], v[2p + 1][d]) in bf16; zeros past
 * maxpos. hd % 16 == 0. */
static void load_vpairs(uint32_t *dst, const void *kv, int64_t ofs, const int32_t *table, int bs, int hd, int b,
                        int64_t maxpos) {
    for (int p = 0; p < KB / 2; ++p) {
        const uint16_t *src[2];
        for (int h = 0; h < 2; ++h) {
            int64_t k = (int64_t)b * KB + 2 * p + h;
            src[h] = k > maxpos ? NULL : (const uint16_t *)kv + ofs + ((int64_t)table[k / bs] * bs + k % bs) * hd;
        }
        for (int d = 0; d < hd; d += 16) {
            __m512i lo = src[0] ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src[0] + d)))
                                : _mm512_setzero_si512();
            __m512i hi = src[1] ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(src[1] + d)))
                                : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + p * hd + d, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* R rows (a compile-time constant at each call site) of pv_block_bf16, head_dim 64. */
static inline __attribute__((always_inline)) void pv_rows_bf16(const int R, const float *const *ep,
                                                                float *const *o, const uint32_t *vp) {
    __m512 x[4][4]; /* R rows x 64 dims */
    for (int u = 0; u < R; ++u)
        for (int h = 0; h < 4; ++h) x[u][h] = _mm512_loadu_ps(o[u] + 16 * h);
    for (int p = 0; p < KB / 2; ++p) {
        __m512bh v[4];
        for (int h = 0; h < 4; ++h) v[h] = (__m512bh)_mm512_loadu_si512(vp + p * 64 + 16 * h);
        for (int u = 0; u < R; ++u) {
            __m512bh w = (__m512bh)_mm512_set1_epi32(ld32(ep[u] + p));
            for (int h = 0; h < 4; ++h) x[u][h] = _mm512_dpbf16_ps(x[u][h], w, v[h]);
        }
    }
    for (int u = 0; u < R; ++u)
        for (int h = 0; h < 4; ++h) _mm512_storeu_ps(o[u] + 16 * h, x[u][h]);
}

/* o_i[d] += sum over key pairs of (e_i pair) . (v pair)[d] with VDPBF16PS; ep: each row's 8 weight pairs of this
 * block (bf16, from the float32 weights rounded to nearest even). Every row takes the same instructions. */
static void pv_block_bf16(const float *const *ep, float *const *o, int nr, const uint32_t *vp, int hd) {
    int i = 0;
    if (hd == 64) { /* 4 rows at a time, then the rest together */
        for (; i + 4 <= nr; i += 4) pv_rows_bf16(4, ep + i, o + i, vp);
#define PV_REST(R) pv_rows_bf16(R, ep + i, o + i, vp)
        KVSERVE_ROWS3(nr - i, PV_REST)
#undef PV_REST
        i = nr;
    }
    for (; i < nr; ++i) {
        for (int c = 0; c < hd; c += 16) {
            __m512 x = _mm512_loadu_ps(o[i] + c);
            for (int p = 0; p < KB / 2; ++p)
                x = _mm512_dpbf16_ps(x, (__m512bh)_mm512_set1_epi32(ld32(ep[i] + p)),
                                     (__m512bh)_mm512_loadu_si512(vp + p * hd + c));
            _mm512_storeu_ps(o[i] + c, x);
        }
    }
}

#define KVSERVE_DPBF16 1
#else
#define KVSERVE_DPBF16 0
#endif

/* A row's nblk blocks of scores s -> exp(s - mx), and their lane sums (lane = key mod 16, blocks added in order)
 * into l. to_pairs: the weights are stored as bf16 pairs instead (VDPBF16PS P.V), in place: block b's 8 words
 * land below its 16 floats, which were read before. One pass, 16 lanes at a time where AVX-512 is. */
static void softmax_weights(float *s, int nblk, float mx, float *l, int to_pairs) {
#ifdef __AVX512F__
    const __m512 m = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int b = 0; b < nblk; ++b) {
        const __m512 e = exp_nonpos16(_mm512_sub_ps(_mm512_loadu_ps(s + b * KB), m));
        sum = _mm512_add_ps(sum, e);
#if KVSERVE_DPBF16
        if (to_pairs) {
            _mm256_storeu_si256((__m256i *)((uint32_t *)s + b * (KB / 2)), (__m256i)_mm512_cvtneps_pbh(e));
            continue;
        }
#endif
        _mm512_storeu_ps(s + b * KB, e);
    }
    _mm512_storeu_ps(l, sum);
#else
    (void)to_pairs; /* pairs need VDPBF16PS, hence AVX-512 */
    for (int i = 0; i < nblk * KB; ++i) s[i] = exp_nonpos(s[i] - mx);
    for (int j = 0; j < KB; ++j) l[j] = 0.0f;
    for (int b = 0; b < nblk; ++b)
        for (int j = 0; j < KB; ++j) l[j] += s[b * KB + j];
#endif
}

/* Rows (of its members' tokens x G query heads, member after member) of one item against one KV head.
 * fetched: its first blocks were asked for while the previous item ran; next: the item whose blocks to ask for
 * meanwhile (or NULL). Each row takes exactly the operations it takes alone: key blocks in order, two at a time
 * in pass 1, one at a time in pass 2, from whichever table holds them; so sharing a load changes no bit. */
static void attend_item(const Item *it, const Member *members, int fetched, const Item *next, const void *q,
                        float scale, const void *kv, int is_bf16, const int32_t *tables, int max_blocks,
                        const int64_t *pos, float *out, int H, int G, int KVH, int64_t nb, int bs, int hd,
                        float *buf) {
    const Member *mem = members + it->member0;
    const int nm = it->nmembers;
    int nrows = 0, nblk = 0;
    for (int m = 0; m < nm; ++m) {
        nrows += mem[m].ntok * G;
        const int mb = (int)(pos[mem[m].row_start + mem[m].ntok - 1] / KB) + 1;
        nblk = mb > nblk ? mb : nblk;
    }
    const int width = nblk * KB;
    float *scores = buf;                        /* nrows * width */
    float *kt = scores + (size_t)nrows * width; /* hd * 2 KB: two key blocks, transposed */
    float *vb = kt + (size_t)hd * 2 * KB;       /* KB * hd */
    float *acc = vb + (size_t)KB * hd;          /* nrows * hd */
    float *lanes = acc + (size_t)nrows * hd;    /* nrows * KB: lane maxima (pass 1), then exp sums */
    float *qs = lanes + (size_t)nrows * KB;     /* nrows * hd: float32 queries times scale */
    const int pairs = KVSERVE_DPBF16 && is_bf16 && hd % 2 == 0;
    const int vpairs = pairs && hd % 16 == 0; /* P.V from bf16 weights too, as torch's bf16 flash kernel does */
    const int64_t head_stride = nb * bs * hd; /* elements between heads in the cache */
    const int64_t kofs = (int64_t)it->kv_head * head_stride;
    const int64_t vofs = ((int64_t)KVH + it->kv_head) * head_stride;
    const int e = is_bf16 ? 2 : 4;
    if (!fetched) { /* not asked for while the previous item ran: all at once */
        prefetch_item(it, 0, kv, e, tables, max_blocks, pos, KVH, nb, bs, hd);
        prefetch_item(it, 1, kv, e, tables, max_blocks, pos, KVH, nb, bs, hd);
    }
    Fetcher fnext;
    fetcher_init(&fnext, next, kv, e, tables, max_blocks, pos, KVH, nb, bs, hd);
    const int per_step = (fnext.n * fnext.lines + nblk + (nblk + 1) / 2 - 1) / (nblk + (nblk + 1) / 2);
    const float *qrow[nrows];
    const uint16_t *qpair[nrows];
    float *orow[nrows];
    int64_t rpos[nrows];
    int rmem[nrows];      /* the member of each row */
    int mfirst[nm + 1];   /* rows of member m: mfirst[m] .. mfirst[m + 1] */
    int act[nrows];       /* the rows a block step computes (gathered into the pointer arrays below) */
    const float *aq[nrows];
    const uint16_t *aqp[nrows];
    const float *aep[nrows]; /* bf16 weight pairs, one 32-bit word per float slot's worth */
    float *ae[nrows], *as1[nrows], *am[nrows], *ao[nrows];
    int64_t alim[nrows];
    int r = 0;
    for (int m = 0; m < nm; ++m) {
        mfirst[m] = r;
        for (int t = 0; t < mem[m].ntok; ++t)
            for (int g = 0; g < G; ++g, ++r) {
                const int64_t qofs = ((int64_t)(mem[m].row_start + t) * H + (int64_t)it->kv_head * G + g) * hd;
                float *qr = qs + (size_t)r * hd;
                if (is_bf16) {
                    qpair[r] = (const uint16_t *)q + qofs;
                    for (int d = 0; d < hd; ++d) qr[d] = bf16_to_f32(((const uint16_t *)q)[qofs + d]) * scale;
                } else {
                    for (int d = 0; d < hd; ++d) qr[d] = ((const float *)q)[qofs + d] * scale;
                }
                qrow[r] = qr;
                rpos[r] = pos[mem[m].row_start + t];
                rmem[r] = m;
                orow[r] = acc + (size_t)r * hd;
                for (int j = 0; j < KB; ++j) lanes[r * KB + j] = -INFINITY;
            }
    }
    mfirst[nm] = r;
    /* pass 1: scores, masked past each row's position, and lane maxima, two key blocks at a time: first the
     * leader's blocks for every member that shares them, then each other member's own. */
    for (int b = 0; b < nblk; b += 2) {
        for (int m = 0; m < nm; ++m) {
            if (m > 0 && mem[m].shared > b) continue; /* loaded with the leader's */
            const int64_t mpos = pos[mem[m].row_start + mem[m].ntok - 1];
            if (mpos / KB < b) continue; /* this member has no block b */
            const int32_t *table = tables + (size_t)mem[m].seq * max_blocks;
            prefetch_block(kv, e, kofs, table, bs, hd, b + FETCH_AHEAD, mpos);
            prefetch_block(kv, e, kofs, table, bs, hd, b + FETCH_AHEAD + 1, mpos);
            if (m == 0) fetch_lines(&fnext, per_step);
            if (pairs) {
#if KVSERVE_DPBF16
                load_kpairs((uint32_t *)kt, 0, kv, kofs, table, bs, hd, b, mpos);
                load_kpairs((uint32_t *)kt, KB, kv, kofs, table, bs, hd, b + 1, mpos);
#endif
            } else {
                load_block(kt, 1, 2 * KB, kv, is_bf16, kofs, table, bs, hd, b, mpos);
                load_block(kt + KB, 1, 2 * KB, kv, is_bf16, kofs, table, bs, hd, b + 1, mpos); /* zeros past it */
            }
            int na = 0;
            for (int x = mfirst[m]; x < (m == 0 ? nrows : mfirst[m + 1]); ++x) {
                if (m == 0 && rmem[x] > 0 && mem[rmem[x]].shared <= b) continue;
                if (rpos[x] / KB < b) continue;
                act[na++] = x;
            }
            for (int i = 0; i < na; ++i) {
                const int x = act[i];
                aq[i] = qrow[x];
                aqp[i] = qpair[x];
                ae[i] = scores + (size_t)x * width + b * KB;
                as1[i] = ae[i] + KB; /* written only when the row reaches block b + 1 (inside width) */
                am[i] = lanes + x * KB;
                alim[i] = rpos[x] - (int64_t)b * KB;
            }
            if (na == 0) continue;
            if (pairs) {
#if KVSERVE_DPBF16
                qk_pair_bf16(aqp, ae, as1, am, alim, na, (const uint32_t *)kt, hd, scale);
#endif
            } else {
                qk_pair(aq, ae, as1, am, alim, na, kt, hd);
            }
        }
    }
    /* pass 2: exp(score - max) over each row's own blocks, lane sums, P.V. The first values are asked for again
     * after a long pass 1, which may have pushed them out. */
    if (nblk > FETCH_AHEAD) prefetch_item(it, 1, kv, e, tables, max_blocks, pos, KVH, nb, bs, hd);
    memset(acc, 0, sizeof(float) * (size_t)nrows * hd);
    for (int x = 0; x < nrows; ++x) {
        float mx = -INFINITY;
        for (int j = 0; j < KB; ++j) mx = lanes[x * KB + j] > mx ? lanes[x * KB + j] : mx;
        softmax_weights(scores + (size_t)x * width, (int)(rpos[x] / KB) + 1, mx, lanes + x * KB, vpairs);
    }
    for (int b = 0; b < nblk; ++b) {
        for (int m = 0; m < nm; ++m) {
            if (m > 0 && mem[m].shared > b) continue;
            const int64_t mpos = pos[mem[m].row_start + mem[m].ntok - 1];
            if (mpos / KB < b) continue;
            const int32_t *table = tables + (size_t)mem[m].seq * max_blocks;
            prefetch_block(kv, e, vofs, table, bs, hd, b + FETCH_AHEAD, mpos);
            if (m == 0) fetch_lines(&fnext, per_step);
            int na = 0;
            for (int x = mfirst[m]; x < (m == 0 ? nrows : mfirst[m + 1]); ++x) {
                if (m == 0 && rmem[x] > 0 && mem[rmem[x]].shared <= b) continue;
                if (rpos[x] / KB < b) continue;
                act[na++] = x;
            }
            if (na == 0) continue;
            for (int i = 0; i < na; ++i) ao[i] = orow[act[i]];
            if (vpairs) {
#if KVSERVE_DPBF16
                load_vpairs((uint32_t *)vb, kv, vofs, table, bs, hd, b, mpos);
                for (int i = 0; i < na; ++i) aep[i] = scores + (size_t)act[i] * width + b * (KB / 2);
                pv_block_bf16(aep, ao, na, (const uint32_t *)vb, hd);
#endif
            } else {
                load_block(vb, 0, 0, kv, is_bf16, vofs, table, bs, hd, b, mpos);
                for (int i = 0; i < na; ++i) ae[i] = scores + (size_t)act[i] * width + b * KB;
                pv_block(ae, ao, na, vb, hd);
            }
        }
    }
    for (int x = 0; x < nrows; ++x) {
        float den = 0.0f;
        for (int j = 0; j < KB; ++j) den += lanes[x * KB + j];
        const Member *mm = &mem[rmem[x]];
        const int t = (x - mfirst[rmem[x]]) / G, g = (x - mfirst[rmem[x]]) % G;
        float *dst = out + ((int64_t)(mm->row_start + t) * H + (int64_t)it->kv_head * G + g) * hd;
        for (int d = 0; d < hd; ++d) dst[d] = acc[(size_t)x * hd + d] / den;
    }
}

/* Key blocks (16 keys, an even count) that sequences a and b read from the same cache blocks, counted only
 * where both have keys: block tables equal up to there. */
static int shared_blocks(const int32_t *ta, int64_t pa, const int32_t *tb, int64_t pb, int bs) {
    const int64_t keys = (pa < pb ? pa : pb) + 1; /* keys both sequences have */
    int64_t same = 0;
    while (same * bs < keys && ta[same] == tb[same]) ++same;
    int64_t k = same * bs < keys ? same * bs : keys;
    int blocks = (int)(k / KB);
    return blocks & ~1;
}

/* The items for groups cut into chunks of at most `cap` tiles and MAX_ROWS rows (a tile that alone has more
 * rows is a chunk of its own), times the KV heads. Returns how many; with out, writes them and their members
 * (a chunk's first tile leads it; a member shares with it what both share with the group's leader).
 * *max_rows: the most rows in one item. */
static int plan_items(const Member *tiles, const int *group, int nt, int cap, int G, int KVH, Item *out,
                      Member *members, int *max_rows) {
    int n = 0, nmem = 0;
    *max_rows = 1;
    for (int i = 0; i < nt; ++i) {
        if (group[i] != i) continue;
        int in_chunk = 0, rows = 0, first = 0, lead = i;
        for (int j = i; j <= nt; ++j) {
            if (j < nt && group[j] != i) continue;
            const int r = j < nt ? tiles[j].ntok * G : 0;
            if (j == nt || (in_chunk > 0 && (in_chunk == cap || rows + r > MAX_ROWS))) { /* close the chunk */
                for (int h = 0; h < KVH; ++h, ++n)
                    if (out) {
                        const Member *l = &members[first];
                        out[n] = (Item){l->row_start, l->ntok, l->seq, h, first, nmem - first};
                    }
                if (j == nt) break;
                in_chunk = 0, rows = 0;
            }
            if (in_chunk == 0) { /* tile j leads a new chunk */
                first = nmem, lead = j;
                if (out) members[nmem] = tiles[j], members[nmem].shared = INT32_MAX;
            } else if (out) {
                const int32_t a = tiles[j].shared, c = tiles[lead].shared;
                members[nmem] = tiles[j], members[nmem].shared = a < c ? a : c;
            }
            ++nmem, ++in_chunk, rows += r;
            *max_rows = rows > *max_rows ? rows : *max_rows;
        }
    }
    return n;
}

/* Bit 0: bf16 caches take the VDPBF16PS path (their numbers differ from the float32-conversion path's). */
int kvserve_attention_features(void) { return KVSERVE_DPBF16; }

/* q: (T, H, hd) in the cache's dtype, unscaled; out: (T, H, hd) float32; kv: (2, KVH, nb, bs, hd) float32 or
 * bfloat16; tables: (S, max_blocks) int32;
 * segs: (S, 2) int32 = (first row, tokens) per sequence, its block table is tables[s]; pos: (T,) int64.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int kvserve_paged_attention(const void *q, float scale, const void *kv, int is_bf16, const int32_t *tables,
                            int max_blocks,
                            const int32_t *segs, int num_segs, const int64_t *pos, float *out, int H, int KVH,
                            int64_t nb, int bs, int hd, int tile, int nthreads) {
    const int G = H / KVH;
    int nitems = 0;
    for (;;) { /* smaller tiles when there are too few items to keep every thread busy (a short suffix over a
                * long cached prefix); a tile only groups rows, it never changes a row's bits. Two items per
                * thread, not more: each item loads and transposes its keys and values once for all its rows,
                * so 32 new tokens over 3 KV heads on 2 threads take 6 items of 16 tokens, not 12 of 8 (the
                * warm 2,000 + 32 request's attention 4-7% faster, measured alternating both builds) */
        nitems = 0;
        for (int s = 0; s < num_segs; ++s) nitems += ((segs[2 * s + 1] + tile - 1) / tile) * KVH;
        if (tile <= 8 || nitems >= 2 * nthreads) break;
        tile /= 2;
    }
    /* Tiles; a sequence whose new tokens fit one tile (a decode, a short suffix) may join the group of an earlier
     * such sequence whose first key blocks it reads from the same cache blocks. */
    int ntiles = 0;
    for (int s = 0; s < num_segs; ++s) ntiles += (segs[2 * s + 1] + tile - 1) / tile;
    Member *tiles = (Member *)malloc(sizeof(Member) * (ntiles > 0 ? ntiles : 1));
    Member *members = (Member *)malloc(sizeof(Member) * (ntiles > 0 ? ntiles : 1));
    int *group = (int *)malloc(sizeof(int) * (ntiles > 0 ? ntiles : 1)); /* leader tile of each tile */
    if (!tiles || !members || !group) {
        free(tiles), free(members), free(group);
        return -1;
    }
    int nt = 0;
    int64_t max_width = KB;
    for (int s = 0; s < num_segs; ++s) {
        for (int t0 = 0; t0 < segs[2 * s + 1]; t0 += tile) {
            int ntok = segs[2 * s + 1] - t0 < tile ? segs[2 * s + 1] - t0 : tile;
            int64_t w = (pos[segs[2 * s] + t0 + ntok - 1] / KB + 1) * KB;
            if (w > max_width) max_width = w;
            tiles[nt] = (Member){segs[2 * s] + t0, ntok, s, INT32_MAX};
            group[nt] = segs[2 * s + 1] <= tile ? -1 : nt; /* -1: may join a group */
            ++nt;
        }
    }
    int largest = 1;
    for (int i = 0; i < nt; ++i) {
        if (group[i] != -1) continue;
        group[i] = i;
        int size = 1;
        const int32_t *ti = tables + (size_t)tiles[i].seq * max_blocks;
        const int64_t pi = pos[tiles[i].row_start + tiles[i].ntok - 1];
        for (int j = i + 1; j < nt; ++j) {
            if (group[j] != -1) continue;
            const int32_t *tj = tables + (size_t)tiles[j].seq * max_blocks;
            if (ti[0] != tj[0]) continue;
            const int sb = shared_blocks(ti, pi, tj, pos[tiles[j].row_start + tiles[j].ntok - 1], bs);
            if (sb < 2) continue;
            group[j] = i;
            tiles[j].shared = sb;
            ++size;
        }
        largest = size > largest ? size : largest;
    }
    /* Items: each group cut into chunks of at most `cap` tiles and MAX_ROWS rows, times the KV heads; the cap is
     * halved while that leaves fewer than two items per thread (a shared block is then read once per chunk). */
    int cap = largest < MAX_GROUP ? largest : MAX_GROUP, max_rows = 1;
    for (;;) {
        nitems = plan_items(tiles, group, nt, cap, G, KVH, NULL, NULL, &max_rows);
        if (cap <= 1 || nitems >= 2 * nthreads) break;
        cap = (cap + 1) / 2;
    }
    Item *items = (Item *)malloc(sizeof(Item) * (nitems > 0 ? nitems : 1));
    if (!items) {
        free(tiles), free(members), free(group);
        return -1;
    }
    plan_items(tiles, group, nt, cap, G, KVH, items, members, &max_rows);
    const int64_t rows = max_rows;
    const size_t scratch = (size_t)(rows * max_width + 3 * (int64_t)hd * KB + 2 * rows * hd + rows * KB);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)aligned_alloc(64, ((scratch * sizeof(float)) + 63) / 64 * 64);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
        int predicted = -1; /* the item this thread asked for while running the previous one */
#pragma omp for schedule(dynamic, 1)
        for (int i = nitems - 1; i >= 0; --i) { /* later tiles of a prompt read more keys: start with them */
            /* items of equal cost alternate between the threads: this thread's next one is likely i - nthreads */
            const Item *next = i >= nthreads ? &items[i - nthreads] : NULL;
            const int fetched = i == predicted;
            predicted = i - nthreads;
            if (buf)
                attend_item(&items[i], members, fetched, next, q, scale, kv, is_bf16, tables, max_blocks, pos, out, H,
                            G, KVH, nb, bs, hd, buf);
        }
        free(buf);
    }
    free(items), free(tiles), free(members), free(group);
    return failed ? -1 : 0;
}
