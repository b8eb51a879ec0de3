/* Linear layers for CPUs: y = x W^T (+ bias) (+ residual), batch-invariant by construction.
 *
 * Every output element y[m, n] is one chain of fused multiply-adds over k = 0, 1, ..., K-1 in order
 * (bfloat16: one VDPBF16PS step per pair of k, pairs in order), started from zero, then bias, then residual.
 * No split of K, no tree, no dependence on M, on the tile a row falls in, or on the thread that runs it, so a
 * row's bits are the same alone, padded or in any batch (tests/unit/test_native_linear.py). This is what
 * lets a batch-1 decode step read the weights once, at the memory's speed, with no padding row and no
 * separate GEMV kernel.
 *
 * Weights are packed once (kvserve_pack_*): panels of NR = 48 output columns, each panel holding, for every k,
 * its 48 weights contiguously (bfloat16: for every pair of k, 48 interleaved pairs), so a panel streams
 * sequentially. The micro-kernel keeps an (up to) 8-row x 48-column tile of accumulators in 24 registers;
 * every weight vector it loads serves all the tile's rows.
 *
 * SwiGLU epilogue (kvserve_linear_swiglu): gate_up packed with each panel holding 24 gate features and the same
 * 24 features' up columns (kvserve_pack_swiglu), so a tile ends with act = round(silu(g)) * u of its rows,
 * written straight out: the (M, 2I) gate/up output never goes to memory. g and u are rounded as the plain
 * linear's outputs are, and the SwiGLU (swiglu16) uses kvmath.h's exp, so act has the bits of gate_up, then
 * SwiGLU.
 *
 * bfloat16 on CPUs with AMX runs on AMX tiles instead (see KVSERVE_AMX below): the same packed panels, each
 * output element one chain of TDPBF16PS steps over k in chunks of 32; its roundings differ from VDPBF16PS's,
 * so a process uses one or the other for every bf16 linear.
 *
 * Built with kvserve/model/csrc/paged_attention.c's flags (-ffp-contract=off: every fused multiply-add is
 * explicit). Needs AVX-512 (and AVX512-BF16 for bfloat16): kvserve_linear_features says which.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kvmath.h"

#define NR 48
#define MR 8
#define MB 64 /* rows per block: a block's rows are read from cache once per panel */
#define PANEL_MAJOR_BYTES (16LL << 20) /* larger weights: each panel serves every row block in turn */

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define KVSERVE_LINEAR_BF16 2
#else
#define KVSERVE_LINEAR_BF16 0
#endif
#ifdef __AVX512F__
#define KVSERVE_LINEAR_F32 1
#else
#define KVSERVE_LINEAR_F32 0
#endif

#if KVSERVE_LINEAR_BF16 && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KVSERVE_AMX 1
#else
#define KVSERVE_AMX 0
#endif

#if KVSERVE_AMX
/* bfloat16 on CPUs with AMX: each output element is one chain of TDPBF16PS steps over k in chunks of 32, in
 * order, from zero (then bias and residual as below), whatever the rows around it: a tile row's sums read only
 * that row of x and the panel, so rows stay batch-invariant, M = 1 included. The packed panels are already
 * AMX's B layout (for each pair of k, 16 columns' pairs in 64 bytes); 16 rows x 48 columns per tile step, three
 * accumulator tiles. Used for every bf16 linear whose K is a multiple of 32 once the kernel grants this process
 * the AMX state; otherwise VDPBF16PS for all of them (a process never mixes the two: their roundings differ). */
typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int amx_state = -1; /* -1: not asked yet; 1: granted; 0: refused */

static int amx_granted(void) {
    if (amx_state < 0) { /* ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA */
        int ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
        __atomic_store_n(&amx_state, ok, __ATOMIC_SEQ_CST);
    }
    return amx_state;
}

/* Tiles 0-2: accumulators (rows x 16 floats), 3: x (rows x 32 bf16), 4-6: the panel's three 16-column slices. */
static void amx_configure(int rows) {
    TileConfig c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 4; ++t) c.rows[t] = (uint8_t)rows, c.colsb[t] = 64;
    for (int t = 4; t < 7; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
}

/* Rows 0..mr-1 (as configured) of x times one panel -> c[m * NR + n]. */
static void tile_amx(const uint16_t *x, int64_t ldx, int64_t K, const uint16_t *wp, float *c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    for (int64_t k = 0; k < K; k += 32) {
        _tile_loadd(3, x + k, ldx * 2);
        _tile_loadd(4, wp + k * NR, NR * 4);
        _tile_loadd(5, wp + k * NR + 32, NR * 4);
        _tile_loadd(6, wp + k * NR + 64, NR * 4);
        _tile_dpbf16ps(0, 3, 4);
        _tile_dpbf16ps(1, 3, 5);
        _tile_dpbf16ps(2, 3, 6);
    }
    _tile_stored(0, c, NR * 4);
    _tile_stored(1, c + 16, NR * 4);
    _tile_stored(2, c + 32, NR * 4);
}
#endif

/* Bit 0: float32 linears available; bit 1: bfloat16 ones (VDPBF16PS); bit 2: bfloat16 ones on AMX (K % 32 == 0). */
int kvserve_linear_features(void) {
#if KVSERVE_AMX
    const int amx = amx_granted() ? 4 : 0;
#else
    const int amx = 0;
#endif
    return KVSERVE_LINEAR_F32 | KVSERVE_LINEAR_BF16 | amx;
}

/* Output columns per packed panel (the Python side sizes the packed buffers with it). */
int kvserve_linear_panel_width(void) { return NR; }

/* While tiles 2-4 of a block run (the panel is in cache by then), the next panel is fetched from memory, one
 * of its three 64-byte lines per k in each tile: the weights' streaming overlaps the arithmetic when a panel
 * serves several tiles (M > 8). A prefetch changes no number. */
#define PREFETCH_PANEL_ROW(ptr) _mm_prefetch((const char *)(ptr), _MM_HINT_T0)
/* The first tile of a block, which streams the panel from memory, also asks for the line 8 KB ahead (fp32; 4 KB
 * in bf16): more misses in flight than the hardware prefetcher keeps (measured: 5-10% faster at one row). */
#define AHEAD 2048

#define HALF (NR / 2) /* features per panel in a SwiGLU pack */

static inline int64_t panels(int64_t N) { return (N + NR - 1) / NR; }

/* Row of W that packed column n comes from, or -1 for a zero column: W's own rows (inter = 0), or for a SwiGLU
 * pack of W = [gate; up] (2 * inter rows), panel p's columns 0-23 are gate features 24p + j and 24-47 the same
 * features' up rows. */
static inline int64_t source_row(int64_t n, int64_t N, int64_t inter) {
    if (inter == 0) return n < N ? n : -1;
    const int64_t f = n / NR * HALF + n % NR % HALF;
    return f >= inter ? -1 : n % NR < HALF ? f : inter + f;
}

/* W (N, K) row-major, np panels -> out: np * K * NR elements, float32 as [panel][k][column], bf16 (K even) as
 * [panel][k/2][column][k%2]; zero columns past the weight. */
static void pack(int bf, const void *W, int64_t N, int64_t K, int64_t inter, int64_t np, void *out) {
    for (int64_t p = 0; p < np; ++p)
        for (int j = 0; j < NR; ++j) {
            const int64_t r = source_row(p * NR + j, N, inter);
            if (bf) {
                const uint16_t *w = r < 0 ? NULL : (const uint16_t *)W + r * K;
                uint16_t *o = (uint16_t *)out + p * K * NR + 2 * j;
                for (int64_t k = 0; k < K; ++k) o[(k & ~1LL) * NR + (k & 1)] = r < 0 ? 0 : w[k];
            } else {
                const float *w = r < 0 ? NULL : (const float *)W + r * K;
                float *o = (float *)out + p * K * NR + j;
                for (int64_t k = 0; k < K; ++k) o[k * NR] = r < 0 ? 0.0f : w[k];
            }
        }
}

/* W: (N, K) float32 row-major -> out: panels(N) * K * NR floats. */
void kvserve_pack_f32(const float *W, int64_t N, int64_t K, float *out) { pack(0, W, N, K, 0, panels(N), out); }

/* W: (N, K) bfloat16, K even -> out: panels(N) * K * NR bf16. */
void kvserve_pack_bf16(const uint16_t *W, int64_t N, int64_t K, uint16_t *out) {
    pack(1, W, N, K, 0, panels(N), out);
}

/* Panels of a SwiGLU pack of inter features. */
int64_t kvserve_swiglu_panels(int64_t inter) { return (inter + HALF - 1) / HALF; }

/* W = [gate; up]: (2 * inter, K) in the model dtype (bf: bfloat16, K even) -> out: kvserve_swiglu_panels(inter)
 * * K * NR elements. */
void kvserve_pack_swiglu(int bf, const void *W, int64_t inter, int64_t K, void *out) {
    pack(bf, W, 2 * inter, K, inter, kvserve_swiglu_panels(inter), out);
}

#ifdef __AVX512F__
/* Columns n0 .. n0+47 of rows 0..mr-1 (count columns valid): acc + bias + residual, stored float32. */
static inline void store_f32(__m512 acc[MR][3], int mr, float *y, int64_t ldy, const float *bias,
                             const float *res, int64_t ldr, int64_t n0, int64_t count) {
    for (int v = 0; v < 3; ++v) {
        int64_t c = count - 16 * v;
        if (c <= 0) break;
        __mmask16 mk = c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << c) - 1);
        __m512 b = bias ? _mm512_maskz_loadu_ps(mk, bias + n0 + 16 * v) : _mm512_setzero_ps();
        for (int m = 0; m < mr; ++m) {
            __m512 a = bias ? _mm512_add_ps(acc[m][v], b) : acc[m][v];
            if (res) a = _mm512_add_ps(_mm512_maskz_loadu_ps(mk, res + m * ldr + n0 + 16 * v), a);
            _mm512_mask_storeu_ps(y + m * ldy + n0 + 16 * v, mk, a);
        }
    }
}

/* The float32 micro-kernel for MR_ rows (a compile-time constant at each call site, so the row loop unrolls). */
static inline __attribute__((always_inline)) void tile_f32(const int MR_, const float *x, int64_t ldx, int64_t K,
                                                            const float *wp, const float *pf, int ahead,
                                                            __m512 acc[MR][3]) {
    for (int m = 0; m < MR_; ++m) acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        const float *w = wp + k * NR;
        if (pf) PREFETCH_PANEL_ROW(pf + k * NR);
        if (ahead) PREFETCH_PANEL_ROW(w + AHEAD);
        __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16), w2 = _mm512_loadu_ps(w + 32);
        for (int m = 0; m < MR_; ++m) {
            __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
            acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
            acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);
        }
    }
}

static void rows_f32(int mr, const float *x, int64_t ldx, int64_t K, const float *wp, const float *pf, int ahead,
                     __m512 acc[MR][3]) {
#define TILE(R) tile_f32(R, x, ldx, K, wp, pf, ahead, acc)
    KVSERVE_ROWS8(mr, TILE)
#undef TILE
}
#endif

#if KVSERVE_LINEAR_BF16
/* acc + bias rounded to bf16 (the linear's own output, as oneDNN and F.linear round it); then + residual in
 * float32, rounded: the same roundings as `x + F.linear(h, W, b)` in bfloat16. */
static inline void store_bf16(__m512 acc[MR][3], int mr, uint16_t *y, int64_t ldy, const uint16_t *bias,
                              const uint16_t *res, int64_t ldr, int64_t n0, int64_t count) {
    for (int v = 0; v < 3; ++v) {
        int64_t c = count - 16 * v;
        if (c <= 0) break;
        __mmask16 mk = c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << c) - 1);
        __m512 b = bias ? bf16x16_to_f32(bias + n0 + 16 * v, mk) : _mm512_setzero_ps();
        for (int m = 0; m < mr; ++m) {
            __m512 a = round_bf16(bias ? _mm512_add_ps(acc[m][v], b) : acc[m][v]);
            if (res) a = _mm512_add_ps(bf16x16_to_f32(res + m * ldr + n0 + 16 * v, mk), a);
            __m256i out = _mm512_cvtepi32_epi16(round_bf16_bits(a));
            _mm256_mask_storeu_epi16(y + m * ldy + n0 + 16 * v, mk, out);
        }
    }
}

#endif

#ifdef __AVX512F__
/* SwiGLU in 16 lanes, as Hugging Face's `act_fn(gate) * up` rounds in the model dtype: act = round(silu(g)) * u,
 * silu(g) = g / (1 + exp(-|g|)) (g * exp(-|g|) on top for g < 0), round: to bf16 when bf; g and u already
 * rounded as the linear's outputs. */
static inline __m512 swiglu16(__m512 g, __m512 u, int bf) {
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 flipped = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(g), _mm512_set1_epi32(INT32_MIN)));
    const __m512 en = exp_nonpos16(_mm512_mask_blend_ps(neg, flipped, g)); /* exp(-|g|) */
    const __mmask16 nonneg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_GE_OQ);
    const __m512 num = _mm512_mask_blend_ps(nonneg, _mm512_mul_ps(g, en), g);
    __m512 a = _mm512_div_ps(num, _mm512_add_ps(_mm512_set1_ps(1.0f), en));
    if (bf) a = round_bf16(a);
    return _mm512_mul_ps(a, u);
}

/* The SwiGLU of a tile of one SwiGLU-packed panel: for rows m < mr and features j < count,
 * act[m * ld + j] = round(silu(g)) * u, g and u the panel's columns j and 24 + j as the linear's own outputs
 * (rounded to bf16 in bf16), stored in the model dtype. In registers: features 0-15 are acc[.][0] (gate) and
 * lanes 8-15 of acc[.][1] with lanes 0-7 of acc[.][2] (up); features 16-23 of two rows share one vector. */
static void store_swiglu(__m512 acc[MR][3], int mr, int bf, void *act, int64_t ld, int64_t f0, int64_t count) {
    const int64_t e = bf ? 2 : 4;
    const __m512i up_lo = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i g_hi = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i u_hi = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    const __mmask16 lo = count >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << count) - 1);
    const __mmask16 hi = count > 16 ? (__mmask16)((1u << (count - 16)) - 1) : 0;
    for (int m = 0; m < mr; m += 2) { /* rows m and n = m + 1 (m again when m is the last row) */
        const int n = m + 1 < mr ? m + 1 : m;
        __m512 a[2][3];
        for (int i = 0; i < 2; ++i)
            for (int q = 0; q < 3; ++q) {
                a[i][q] = acc[i ? n : m][q];
                if (bf) a[i][q] = round_bf16(a[i][q]);
            }
        for (int i = 0; i < 1 + (n != m); ++i)
            store16((char *)act + ((i ? n : m) * ld + f0) * e,
                    swiglu16(a[i][0], _mm512_permutex2var_ps(a[i][1], up_lo, a[i][2]), bf), lo, bf);
        if (hi) { /* features 16-23 of both rows in one vector: row m's in lanes 0-7, row n's in 8-15 */
            const __m512 r = swiglu16(_mm512_permutex2var_ps(a[0][1], g_hi, a[1][1]),
                                      _mm512_permutex2var_ps(a[0][2], u_hi, a[1][2]), bf);
            store16((char *)act + (m * ld + f0 + 16) * e, r, hi, bf);
            if (n != m) /* lanes 8-15 down to 0-7 */
                store16((char *)act + (n * ld + f0 + 16) * e,
                        _mm512_castsi512_ps(_mm512_alignr_epi32(_mm512_castps_si512(r), _mm512_castps_si512(r), 8)),
                        hi, bf);
        }
    }
}
#endif

#if KVSERVE_LINEAR_BF16
static inline __attribute__((always_inline)) void tile_bf16(const int MR_, const uint16_t *x, int64_t ldx,
                                                             int64_t K, const uint16_t *wp, const uint16_t *pf,
                                                             int ahead, __m512 acc[MR][3]) {
    for (int m = 0; m < MR_; ++m) acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 2) {
        const uint16_t *w = wp + k * NR;
        if (pf) PREFETCH_PANEL_ROW(pf + k * NR);
        if (ahead) PREFETCH_PANEL_ROW(w + AHEAD);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32),
                 w2 = (__m512bh)_mm512_loadu_si512(w + 64);
        for (int m = 0; m < MR_; ++m) {
            int32_t pair;
            memcpy(&pair, x + m * ldx + k, sizeof pair);
            __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xb, w2);
        }
    }
}

static void rows_bf16(int mr, const uint16_t *x, int64_t ldx, int64_t K, const uint16_t *wp, const uint16_t *pf,
                      int ahead, __m512 acc[MR][3]) {
#define TILE(R) tile_bf16(R, x, ldx, K, wp, pf, ahead, acc)
    KVSERVE_ROWS8(mr, TILE)
#undef TILE
}
#endif

#ifdef __AVX512F__
/* A tile's accumulators (rows r0 .. r0 + mr - 1, panel p) out through the linear's epilogue: the SwiGLU
 * activation (inter > 0), else y = acc + bias + residual in the dtype. */
static inline void store_rows(__m512 acc[MR][3], int mr, int bf, int64_t r0, void *y, int64_t N, const void *bias,
                              const void *res, int64_t p, int64_t inter) {
    const int64_t n0 = p * NR, count = N - n0 < NR ? N - n0 : NR;
    if (inter) {
        store_swiglu(acc, mr, bf, (char *)y + r0 * inter * (bf ? 2 : 4), inter, p * HALF,
                     inter - p * HALF < HALF ? inter - p * HALF : HALF);
    } else if (bf) {
#if KVSERVE_LINEAR_BF16
        store_bf16(acc, mr, (uint16_t *)y + r0 * N, N, bias, res ? (const uint16_t *)res + r0 * N : NULL, N, n0,
                   count);
#endif
    } else {
        store_f32(acc, mr, (float *)y + r0 * N, N, bias, res ? (const float *)res + r0 * N : NULL, N, n0, count);
    }
}

/* Rows m0 .. m1-1 of x times one plain packed panel p (in the dtype), out through store_rows. next: the next
 * panel to prefetch while this one is in cache (NULL: none); ahead: the first tile also asks for the panel's
 * lines AHEAD elements on (it streams the panel from memory). */
static void panel_rows(int bf, const void *x, int64_t ldx, int64_t m0, int64_t m1, int64_t K, const char *panel,
                       const char *next, int ahead, int64_t p, void *y, int64_t N, const void *bias, const void *res,
                       int64_t inter) {
    __m512 acc[MR][3];
#if KVSERVE_AMX
    if (bf && K % 32 == 0 && amx_granted()) {
        float c[16 * NR];
        int configured = 0;
        for (int64_t r0 = m0; r0 < m1; r0 += 16) {
            const int rows = m1 - r0 < 16 ? (int)(m1 - r0) : 16;
            if (rows != configured) amx_configure(rows), configured = rows;
            tile_amx((const uint16_t *)x + r0 * ldx, ldx, K, (const uint16_t *)panel, c);
            for (int h = 0; h < rows; h += MR) { /* the epilogues take MR rows of accumulators at a time */
                const int mr = rows - h < MR ? rows - h : MR;
                for (int m = 0; m < mr; ++m)
                    for (int v = 0; v < 3; ++v) acc[m][v] = _mm512_loadu_ps(c + (h + m) * NR + 16 * v);
                store_rows(acc, mr, bf, r0 + h, y, N, bias, res, p, inter);
            }
        }
        return;
    }
#endif
    for (int64_t r0 = m0; r0 < m1; r0 += MR) {
        const int mr = m1 - r0 < MR ? (int)(m1 - r0) : MR, tile = (int)((r0 - m0) / MR);
        /* tiles 1-3: one of the next panel's three 64-byte lines per k each; tile 0 reads 8 KB ahead */
        const void *pf = tile >= 1 && tile <= 3 && next ? next + 64 * (tile - 1) : NULL;
        if (bf) {
#if KVSERVE_LINEAR_BF16
            rows_bf16(mr, (const uint16_t *)x + r0 * ldx, ldx, K, (const uint16_t *)panel, pf, ahead && tile == 0,
                      acc);
#endif
        } else {
            rows_f32(mr, (const float *)x + r0 * ldx, ldx, K, (const float *)panel, pf, ahead && tile == 0, acc);
        }
        store_rows(acc, mr, bf, r0, y, N, bias, res, p, inter);
    }
}

/* The blocked loop both dtypes share (e: bytes per element): (row block, panel) pairs split over the threads,
 * each pair's rows in tiles of MR; tiles of one panel after the first prefetch the next panel. */
static void linear_blocked(int bf, const void *x, int64_t ldx, int64_t M, int64_t K, const void *wp, int64_t N,
                           const void *bias, const void *res, void *y, int64_t inter, int nthreads) {
    /* inter > 0: wp is a SwiGLU pack of inter features, y the (M, inter) activation; else y = x W^T (M, N) */
    const int64_t e = bf ? 2 : 4, np = inter ? kvserve_swiglu_panels(inter) : panels(N), nb = (M + MB - 1) / MB,
                  panel_bytes = K * NR * e;
    const int panel_major = np * panel_bytes > PANEL_MAJOR_BYTES; /* weights past the L3 */
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < nb; ++i)
        for (int64_t j = 0; j < np; ++j) {
            const int64_t b = panel_major ? (i * np + j) % nb : i, p = panel_major ? (i * np + j) / nb : j;
            const int64_t m1 = (b + 1) * MB < M ? (b + 1) * MB : M;
            const char *panel = (const char *)wp + p * panel_bytes;
            panel_rows(bf, x, ldx, b * MB, m1, K, panel, p + 1 < np ? panel + panel_bytes : NULL, 1, p, y, N, bias,
                       res, inter);
        }
}
#endif

/* x: (M, K) float32 with row stride ldx; wp: kvserve_pack_f32(W); bias: (N,) or NULL; res: (M, N) or NULL
 * (may be y itself); y: (M, N) contiguous. */
void kvserve_linear_f32(const float *x, int64_t ldx, int64_t M, int64_t K, const float *wp, int64_t N,
                        const float *bias, const float *res, float *y, int nthreads) {
#ifdef __AVX512F__
    linear_blocked(0, x, ldx, M, K, wp, N, bias, res, y, 0, nthreads);
#else
    (void)x, (void)ldx, (void)M, (void)K, (void)wp, (void)N, (void)bias, (void)res, (void)y, (void)nthreads;
#endif
}

/* As kvserve_linear_f32, in bfloat16 (float32 accumulation); K even. */
void kvserve_linear_bf16(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *wp, int64_t N,
                         const uint16_t *bias, const uint16_t *res, uint16_t *y, int nthreads) {
#if KVSERVE_LINEAR_BF16
    linear_blocked(1, x, ldx, M, K, wp, N, bias, res, y, 0, nthreads);
#else
    (void)x, (void)ldx, (void)M, (void)K, (void)wp, (void)N, (void)bias, (void)res, (void)y, (void)nthreads;
#endif
}

/* act (M, inter) = SwiGLU of x [gate; up]^T for wp from kvserve_pack_swiglu (bf: bfloat16, K even); x with row
 * stride ldx. */
void kvserve_linear_swiglu(int bf, const void *x, int64_t ldx, int64_t M, int64_t K, const void *wp, int64_t inter,
                           void *act, int nthreads) {
#ifdef __AVX512F__
    if (bf && !KVSERVE_LINEAR_BF16) return;
    linear_blocked(bf, x, ldx, M, K, wp, 2 * inter, NULL, NULL, act, inter, nthreads);
#else
    (void)bf, (void)x, (void)ldx, (void)M, (void)K, (void)wp, (void)inter, (void)act, (void)nthreads;
#endif
}

/* ------------------------------------------------------------------------------------------ quantized weights
 *
 * GGUF's Q8_0, Q4_0, Q4_1, Q4_K and Q6_K weights run as stored: kvserve/model/quant.py repacks each tensor at
 * load, without a float copy, into panels of the same 48 columns (and the same SwiGLU column order) as the plain
 * packs. A panel is K / group records, one per `group` input features: the 48 columns' scales S, their offsets B
 * (has_bias), both float16 (f16: where the file's scales are float16, exactly) or float32 (the K-quants'
 * products of two scales), then the codes: 8-bit, one signed byte per weight as [k][column]; 4-bit, one byte
 * per pair of k as [k/2][column], the even k in the low nibble, value = nibble - offset.
 *
 * A weight is w = S * q, then + B, each rounded in float32: what gguf-py's dequantizer computes (and, for
 * bfloat16, then rounded to bf16 as the dequantized bf16 model's weight is). S * q never rounds: S is a float16
 * (11 significant bits) or a K-quant's exact product of a float16 and its 6-bit (Q4_K) or int8 (Q6_K) scale
 * (at most 18 bits), q an integer of at most 7 significant bits (4 with Q4_K's S, 5 with Q6_K's), so every
 * product fits float32's 24 bits; hence one FMA, S * q + B rounded once, gives the two roundings' bits. The micro-kernels below multiply
 * exactly those numbers in exactly the plain kernels' order (one chain of FMAs over k, VDPBF16PS over pairs of
 * k), so a quantized linear's outputs have the bits of the plain linear over the dequantized weights, at every
 * row count. Up to QROWS rows the weights are dequantized in registers, straight into the chain: a decode step
 * streams the quantized bytes once. More rows (and AMX): each (row block, panel) work item dequantizes its
 * panel once into a per-thread scratch in the plain layout, and the plain tile kernels read it for every row.
 */
typedef struct {
    int64_t kind;     /* 0: plain packed panels in the dtype, at data; 1: quantized panels */
    int64_t data;     /* address of the panels */
    int64_t bits;     /* 4 or 8 */
    int64_t group;    /* input features per record (16 or 32) */
    int64_t offset;   /* 4-bit: value = nibble - offset */
    int64_t has_bias; /* records hold B */
    int64_t f16;      /* S and B stored as float16 */
} WeightDesc;

#define QROWS 4 /* rows dequantized in registers: 3 * QROWS accumulators, 3 scales, 3 offsets, weights */
#define QMB 256 /* rows per work item above QROWS: each item dequantizes its panel once */

static inline int64_t q_record_header(const WeightDesc *d) { return NR * (d->f16 ? 2 : 4) * (1 + d->has_bias); }
static inline int64_t q_record_bytes(const WeightDesc *d) { return q_record_header(d) + NR * d->group * d->bits / 8; }

/* Bytes of one quantized panel of K input features (the Python side sizes and fills them). */
int64_t kvserve_q_panel_bytes(const int64_t *desc, int64_t K) {
    const WeightDesc *d = (const WeightDesc *)desc;
    return K / d->group * q_record_bytes(d);
}

#ifdef __AVX512F__
typedef struct {
    __m512 s[3], b[3];
} QScales;

static inline __attribute__((always_inline)) void q_scales(const int HB, const WeightDesc *d, const char *rec,
                                                           QScales *q) {
    for (int v = 0; v < 3; ++v) {
        if (d->f16) {
            q->s[v] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + 32 * v)));
            if (HB) q->b[v] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rec + 96 + 32 * v)));
        } else {
            q->s[v] = _mm512_loadu_ps((const float *)rec + 16 * v);
            if (HB) q->b[v] = _mm512_loadu_ps((const float *)rec + 48 + 16 * v);
        }
    }
}

/* The float32 weights of input features 2t and 2t + 1 of a record (codes c), columns 16v .. 16v + 15. BITS and
 * HB compile-time constants at every call site; tbl[n] = n - offset (4-bit: the nibble read as its value). */
static inline __attribute__((always_inline)) void q_pair(const int BITS, const int HB, const char *c, int64_t t,
                                                         int v, __m512 tbl, const QScales *q, __m512 *w0,
                                                         __m512 *w1) {
    __m512 a, b;
    if (BITS == 4) {
        const __m512i n = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + t * NR + 16 * v)));
        a = _mm512_permutexvar_ps(n, tbl); /* the low 4 bits of each lane index the table */
        b = _mm512_permutexvar_ps(_mm512_srli_epi32(n, 4), tbl);
    } else {
        a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + 2 * t * NR + 16 * v))));
        b = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + (2 * t + 1) * NR + 16 * v))));
    }
    /* S * q is exact in float32 for every format (see above), so fma(S, q, B) == round(round(S * q) + B) */
    *w0 = HB ? _mm512_fmadd_ps(q->s[v], a, q->b[v]) : _mm512_mul_ps(q->s[v], a);
    *w1 = HB ? _mm512_fmadd_ps(q->s[v], b, q->b[v]) : _mm512_mul_ps(q->s[v], b);
}

static inline __m512 q_table(const WeightDesc *d) {
    return _mm512_sub_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_ps((float)d->offset));
}

#if KVSERVE_LINEAR_BF16
/* Two float32 weight vectors as 16 bf16 pairs (a's in the low halves): each rounded to nearest even, as
 * f32_to_bf16 rounds (the weights are finite and never subnormal: products of a scale and a small integer). */
static inline __m512bh q_bf16_pairs(__m512 a, __m512 b) {
    static const uint16_t pairs[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,  21, 6,  22, 7,  23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i order = _mm512_loadu_si512(pairs);
    return (__m512bh)_mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(b, a));
}
#endif

/* One panel's weights dequantized into out in the plain packed layout of the dtype (float32 [k][48], bf16
 * [k/2][48][2]): the bits the plain pack of the dequantized weight holds. */
static inline __attribute__((always_inline)) void q_unpack_panel_t(const int BITS, const int HB, const WeightDesc *d,
                                                                   const char *panel, int64_t K, int bf, void *out) {
    const int64_t G = d->group, rb = q_record_bytes(d), hdr = q_record_header(d);
    const __m512 tbl = q_table(d);
    for (int64_t g = 0; g < K / G; ++g) {
        const char *rec = panel + g * rb;
        QScales q;
        q_scales(HB, d, rec, &q);
        for (int64_t t = 0; t < G / 2; ++t) {
            const int64_t k = g * G + 2 * t;
            for (int v = 0; v < 3; ++v) {
                __m512 w0, w1;
                q_pair(BITS, HB, rec + hdr, t, v, tbl, &q, &w0, &w1);
                if (bf) {
#if KVSERVE_LINEAR_BF16
                    _mm512_storeu_si512((uint16_t *)out + k * NR + 32 * v, (__m512i)q_bf16_pairs(w0, w1));
#endif
                } else {
                    _mm512_storeu_ps((float *)out + k * NR + 16 * v, w0);
                    _mm512_storeu_ps((float *)out + (k + 1) * NR + 16 * v, w1);
                }
            }
        }
    }
}

static void q_unpack_panel(const WeightDesc *d, const char *panel, int64_t K, int bf, void *out) {
    if (d->bits == 4)
        d->has_bias ? q_unpack_panel_t(4, 1, d, panel, K, bf, out) : q_unpack_panel_t(4, 0, d, panel, K, bf, out);
    else
        d->has_bias ? q_unpack_panel_t(8, 1, d, panel, K, bf, out) : q_unpack_panel_t(8, 0, d, panel, K, bf, out);
}

/* Up to QROWS rows of x times one quantized panel, weights dequantized in registers: the chain of tile_f32 /
 * tile_bf16 over the same weight bits. */
static inline __attribute__((always_inline)) void tile_q(const int MR_, const int BITS, const int HB, int bf,
                                                         const WeightDesc *d, const void *x, int64_t ldx, int64_t K,
                                                         const char *panel, __m512 acc[MR][3]) {
    const int64_t G = d->group, rb = q_record_bytes(d), hdr = q_record_header(d);
    const __m512 tbl = q_table(d);
    for (int m = 0; m < MR_; ++m) acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
    for (int64_t g = 0; g < K / G; ++g) {
        const char *rec = panel + g * rb;
        _mm_prefetch(rec + 2048, _MM_HINT_T0);
        QScales q;
        q_scales(HB, d, rec, &q);
        for (int64_t t = 0; t < G / 2; ++t) {
            const int64_t k = g * G + 2 * t;
            __m512 w0[3], w1[3];
            for (int v = 0; v < 3; ++v) q_pair(BITS, HB, rec + hdr, t, v, tbl, &q, &w0[v], &w1[v]);
            if (bf) {
#if KVSERVE_LINEAR_BF16
                __m512bh wb[3];
                for (int v = 0; v < 3; ++v) wb[v] = q_bf16_pairs(w0[v], w1[v]);
                for (int m = 0; m < MR_; ++m) {
                    int32_t pair;
                    memcpy(&pair, (const uint16_t *)x + m * ldx + k, sizeof pair);
                    const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
                    for (int v = 0; v < 3; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], xb, wb[v]);
                }
#endif
            } else {
                for (int m = 0; m < MR_; ++m) {
                    const __m512 xb = _mm512_set1_ps(((const float *)x)[m * ldx + k]);
                    for (int v = 0; v < 3; ++v) acc[m][v] = _mm512_fmadd_ps(xb, w0[v], acc[m][v]);
                }
                for (int m = 0; m < MR_; ++m) {
                    const __m512 xb = _mm512_set1_ps(((const float *)x)[m * ldx + k + 1]);
                    for (int v = 0; v < 3; ++v) acc[m][v] = _mm512_fmadd_ps(xb, w1[v], acc[m][v]);
                }
            }
        }
    }
}

static inline __attribute__((always_inline)) void rows_q_t(const int BITS, const int HB, int mr, int bf,
                                                           const WeightDesc *d, const void *x, int64_t ldx, int64_t K,
                                                           const char *panel, __m512 acc[MR][3]) {
#define TILE(R) tile_q(R, BITS, HB, bf, d, x, ldx, K, panel, acc)
    KVSERVE_ROWS3(mr > 3 ? 0 : mr, TILE)
    if (mr == 4) TILE(4);
#undef TILE
}

static void rows_q(int mr, int bf, const WeightDesc *d, const void *x, int64_t ldx, int64_t K, const char *panel,
                   __m512 acc[MR][3]) {
    if (d->bits == 4)
        d->has_bias ? rows_q_t(4, 1, mr, bf, d, x, ldx, K, panel, acc) : rows_q_t(4, 0, mr, bf, d, x, ldx, K, panel, acc);
    else
        d->has_bias ? rows_q_t(8, 1, mr, bf, d, x, ldx, K, panel, acc) : rows_q_t(8, 0, mr, bf, d, x, ldx, K, panel, acc);
}

/* A per-thread buffer of at least `bytes` (grown, never shrunk: OpenMP's threads live as long as the process). */
static __thread char *q_scratch;
static __thread int64_t q_scratch_bytes;

static char *q_scratch_buffer(int64_t bytes) {
    if (bytes > q_scratch_bytes) {
        free(q_scratch);
        q_scratch_bytes = (bytes + 4095) / 4096 * 4096;
        q_scratch = aligned_alloc(64, (size_t)q_scratch_bytes);
        if (!q_scratch) q_scratch_bytes = 0;
    }
    return q_scratch;
}

static int linear_q(int bf, const WeightDesc *d, const void *x, int64_t ldx, int64_t M, int64_t K, int64_t N,
                    const void *bias, const void *res, void *y, int64_t inter, int nthreads) {
    const int64_t np = inter ? kvserve_swiglu_panels(inter) : panels(N), pb = kvserve_q_panel_bytes((const int64_t *)d, K);
    const char *wq = (const char *)(intptr_t)d->data;
#if KVSERVE_AMX
    const int amx = bf && K % 32 == 0 && amx_granted();
#else
    const int amx = 0;
#endif
    if (M <= QROWS && !amx) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t p = 0; p < np; ++p) {
            __m512 acc[MR][3];
            rows_q((int)M, bf, d, x, ldx, K, wq + p * pb, acc);
            store_rows(acc, (int)M, bf, 0, y, N, bias, res, p, inter);
        }
        return 0;
    }
    const int64_t nb = (M + QMB - 1) / QMB, plain = K * NR * (bf ? 2 : 4);
    int failed = 0;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nb; ++b)
        for (int64_t p = 0; p < np; ++p) {
            char *panel = q_scratch_buffer(plain);
            if (!panel) {
                failed = 1;
                continue;
            }
            q_unpack_panel(d, wq + p * pb, K, bf, panel);
            panel_rows(bf, x, ldx, b * QMB, (b + 1) * QMB < M ? (b + 1) * QMB : M, K, panel, NULL, 0, p, y, N, bias,
                       res, inter);
        }
    return failed ? -1 : 0;
}
#endif

/* y = x W^T (+ bias) (+ res), or with inter > 0 the SwiGLU activation (M, inter) of W = [gate; up] packed for
 * it, for W described by desc (a WeightDesc: plain panels in the dtype or quantized panels); bf: bfloat16
 * (K even). Returns 0, or -1 when the scratch could not be allocated. */
int kvserve_linear_w(const int64_t *desc, int bf, const void *x, int64_t ldx, int64_t M, int64_t K, int64_t N,
                     const void *bias, const void *res, void *y, int64_t inter, int nthreads) {
#ifdef __AVX512F__
    const WeightDesc *d = (const WeightDesc *)desc;
    if (bf && !KVSERVE_LINEAR_BF16) return -1;
    if (M == 0) return 0;
    if (d->kind == 0) {
        linear_blocked(bf, x, ldx, M, K, (const void *)(intptr_t)d->data, inter ? 2 * inter : N, bias, res, y, inter,
                       nthreads);
        return 0;
    }
    return linear_q(bf, d, x, ldx, M, K, inter ? 2 * inter : N, bias, res, y, inter, nthreads);
#else
    (void)desc, (void)bf, (void)x, (void)ldx, (void)M, (void)K, (void)N, (void)bias, (void)res, (void)y, (void)inter,
        (void)nthreads;
    return -1;
#endif
}

/* Rows ids[0..n-1] of a quantized weight (an embedding table) dequantized into out (n, K) in the dtype (bf:
 * bfloat16): the values gguf-py's dequantizer gives, as the plain model's table holds them. */
void kvserve_q_rows(const int64_t *desc, int64_t K, const int64_t *ids, int64_t n, int bf, void *out, int nthreads) {
    const WeightDesc *d = (const WeightDesc *)desc;
    const int64_t G = d->group, rb = q_record_bytes(d), hdr = q_record_header(d), pb = K / G * rb;
    const char *wq = (const char *)(intptr_t)d->data;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= 16)
    for (int64_t i = 0; i < n; ++i) {
        const int64_t p = ids[i] / NR, j = ids[i] % NR;
        for (int64_t g = 0; g < K / G; ++g) {
            const char *rec = wq + p * pb + g * rb;
            float s, b = 0.0f;
            if (d->f16) {
                uint16_t h[2];
                memcpy(&h[0], rec + 2 * j, 2);
                memcpy(&h[1], rec + 2 * (NR + j), 2);
                s = _cvtsh_ss(h[0]);
                if (d->has_bias) b = _cvtsh_ss(h[1]);
            } else {
                memcpy(&s, rec + 4 * j, 4);
                if (d->has_bias) memcpy(&b, rec + 4 * (NR + j), 4);
            }
            const unsigned char *c = (const unsigned char *)rec + hdr;
            for (int64_t t = 0; t < G; ++t) {
                const float q = d->bits == 4 ? (float)((c[t / 2 * NR + j] >> (4 * (t & 1)) & 15) - d->offset)
                                             : (float)(int8_t)c[t * NR + j];
                float w = s * q;
                if (d->has_bias) w = w + b;
                const int64_t o = i * K + g * G + t;
                if (bf)
                    ((uint16_t *)out)[o] = f32_to_bf16(w);
                else
                    ((float *)out)[o] = w;
            }
        }
    }
}
