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
            __m512 acc[MR][3];
            const int64_t m1 = (b + 1) * MB < M ? (b + 1) * MB : M;
            const char *panel = (const char *)wp + p * panel_bytes;
#if KVSERVE_AMX
            if (bf && K % 32 == 0 && amx_granted()) {
                float c[16 * NR];
                int configured = 0;
                for (int64_t m0 = b * MB; m0 < m1; m0 += 16) {
                    const int rows = m1 - m0 < 16 ? (int)(m1 - m0) : 16;
                    if (rows != configured) amx_configure(rows), configured = rows;
                    tile_amx((const uint16_t *)x + m0 * ldx, ldx, K, (const uint16_t *)panel, c);
                    for (int h = 0; h < rows; h += MR) { /* the epilogues take MR rows of accumulators at a time */
                        const int mr = rows - h < MR ? rows - h : MR;
                        for (int m = 0; m < mr; ++m)
                            for (int v = 0; v < 3; ++v) acc[m][v] = _mm512_loadu_ps(c + (h + m) * NR + 16 * v);
                        store_rows(acc, mr, bf, m0 + h, y, N, bias, res, p, inter);
                    }
                }
                continue;
            }
#endif
            for (int64_t m0 = b * MB; m0 < m1; m0 += MR) {
                const int mr = m1 - m0 < MR ? (int)(m1 - m0) : MR, tile = (int)((m0 - b * MB) / MR);
                /* tiles 1-3: one of the next panel's three 64-byte lines per k each; tile 0 reads 8 KB ahead */
                const void *pf = tile >= 1 && tile <= 3 && p + 1 < np ? panel + panel_bytes + 64 * (tile - 1) : NULL;
                if (bf) {
#if KVSERVE_LINEAR_BF16
                    rows_bf16(mr, (const uint16_t *)x + m0 * ldx, ldx, K, (const uint16_t *)panel, pf, tile == 0, acc);
#endif
                } else {
                    rows_f32(mr, (const float *)x + m0 * ldx, ldx, K, (const float *)panel, pf, tile == 0, acc);
                }
                store_rows(acc, mr, bf, m0, y, N, bias, res, p, inter);
            }
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
