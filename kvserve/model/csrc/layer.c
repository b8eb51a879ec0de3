/* One Llama decoder layer for CPUs in one call: the whole layer for T rows, with no Python in between.
 *
 *   h = RMSNorm(x) ; qkv = h Wqkv^T (+ b) ; RoPE(q, k) ; K, V -> paged cache ; a = attention(q)
 *   x = x + a Wo^T ; h = RMSNorm(x) ; act = SwiGLU(h Wgu^T) ; x = x + act Wdown^T
 *
 * The linears and the attention are kvserve_linear_* (linear.c; gate_up packed for its SwiGLU epilogue,
 * linear.c's swiglu16) and kvserve_paged_attention (paged_attention.c); the rest is row-wise: RMSNorm sums x^2
 * in 16 lanes (lane = feature mod 16) folded in lane order; RoPE is element-wise; silu uses kvmath.h's exp.
 * A row's bits depend on nothing but its own inputs, as in the two kernels, so the layer is batch-invariant.
 * Roundings follow Hugging Face's modeling_llama in the model dtype: RMSNorm in float32, rounded before the
 * weight is applied; q*cos + rotate_half(q)*sin with each product and the sum rounded; silu rounded, then the
 * product with up rounded; the attention output rounded before o_proj. In float32 nothing rounds in between.
 *
 * Scratch: the caller passes `work` of kvserve_llama_layer_scratch(...) bytes. Needs an even head_dim (RoPE
 * rotates halves) and full rotary; kvserve/model/llama.py checks both before choosing this path.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kvmath.h"

#include <omp.h>

/* Wall time per section of the layer, summed over calls, for bench/step_breakdown.py; off unless switched on
 * (then a clock read between sections; one model at a time: the sums are plain globals). Sections: 0 RMSNorms, 1 QKV linear, 2 RoPE and KV write, 3 attention,
 * 4 o_proj, 5 gate_up with its SwiGLU epilogue, 6 down_proj. */
#define SECTIONS 7
static int timing;
static double section_time[SECTIONS];

void kvserve_layer_timing(int on) {
    timing = on;
    for (int i = 0; i < SECTIONS; ++i) section_time[i] = 0.0;
}

double kvserve_layer_section_time(int i) { return i >= 0 && i < SECTIONS ? section_time[i] : 0.0; }

/* Adds the time since *t to section i and restarts *t (when timing, read once per call: t > 0). */
static inline void lap(int i, double *t) {
    if (*t == 0.0) return;
    const double now = omp_get_wtime();
    section_time[i] += now - *t;
    *t = now;
}

int kvserve_linear_w(const int64_t *desc, int bf, const void *x, int64_t ldx, int64_t M, int64_t K, int64_t N,
                     const void *bias, const void *res, void *y, int64_t inter, int nthreads);
int kvserve_paged_attention(const void *q, float scale, const void *kv, int is_bf16, const int32_t *tables,
                            int max_blocks, const int32_t *segs, int num_segs, const int64_t *pos, float *out, int H,
                            int KVH, int64_t nb, int bs, int hd, int tile, int nthreads);

#define LANES 16
#define PAR_ROWS 16   /* row-wise work runs on one thread below this many rows */

/* Row-wise work converts a row to float32 once, computes in simple loops over float arrays (which the
 * compiler vectorises) and converts back once: no per-element dtype branch. */
static void load_row(const void *p, int64_t ofs, int64_t n, int bf, float *dst) {
    if (bf) {
        const uint16_t *s = (const uint16_t *)p + ofs;
        for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, (const float *)p + ofs, (size_t)n * sizeof(float));
    }
}

static void store_row(void *p, int64_t ofs, int64_t n, int bf, const float *src) {
    if (bf) {
        uint16_t *d = (uint16_t *)p + ofs;
        for (int64_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)p + ofs, src, (size_t)n * sizeof(float));
    }
}

/* y = x W^T (+ bias) (+ res), or with inter the SwiGLU activation, W described by desc (linear.c's WeightDesc:
 * plain or quantized panels). */
static int linear(int bf, const void *x, int64_t M, int64_t K, const void *desc, int64_t N, const void *bias,
                  const void *res, void *y, int64_t inter, int nt) {
    return kvserve_linear_w((const int64_t *)desc, bf, x, K, M, K, N, bias, res, y, inter, nt);
}

#if KVSERVE_AVX512BW
/* rmsnorm_row in registers: the same lane sums (a masked tail adds exact zeros), fold and roundings. */
static void rmsnorm_row16(const void *x, const float *wf, void *out, int64_t t, int64_t D, float eps, int bf) {
    const int64_t e = bf ? 2 : 4;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += LANES) {
        const __mmask16 mk = D - d >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1);
        const __m512 v = load16((const char *)x + (t * D + d) * e, mk, bf);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    float lanes[LANES], ss = 0.0f;
    _mm512_storeu_ps(lanes, acc);
    for (int j = 0; j < LANES; ++j) ss += lanes[j];
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(ss / (float)D + eps));
    for (int64_t d = 0; d < D; d += LANES) {
        const __mmask16 mk = D - d >= LANES ? (__mmask16)0xffff : (__mmask16)((1u << (D - d)) - 1);
        __m512 v = _mm512_mul_ps(load16((const char *)x + (t * D + d) * e, mk, bf), r);
        if (bf) v = round_bf16(v);
        store16((char *)out + (t * D + d) * e, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, wf + d), v), mk, bf);
    }
}
#endif

/* out[t] = w * round(x[t] / sqrt(mean(x[t]^2) + eps)), per row; wf: the weight in float32. */
static void rmsnorm_row(const void *x, const float *wf, void *out, int64_t t, int64_t D, float eps, int bf) {
#if KVSERVE_AVX512BW
    rmsnorm_row16(x, wf, out, t, D, eps, bf);
#else
    float v[D];
    load_row(x, t * D, D, bf, v);
    float lanes[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int j = 0; j < LANES; ++j) lanes[j] = lanes[j] + v[d + j] * v[d + j];
    for (int j = 0; d + j < D; ++j) lanes[j] = lanes[j] + v[d + j] * v[d + j];
    float ss = 0.0f;
    for (int j = 0; j < LANES; ++j) ss += lanes[j];
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (d = 0; d < D; ++d) v[d] = v[d] * r;
    round_row(v, D, bf);
    for (d = 0; d < D; ++d) v[d] = wf[d] * v[d];
    store_row(out, t * D, D, bf, v);
#endif
}

void kvserve_rmsnorm(const void *x, const void *w, void *out, int64_t T, int64_t D, float eps, int bf, int nt) {
    float wf[D];
    load_row(w, 0, D, bf, wf);
#pragma omp parallel for schedule(static) num_threads(nt) if (T >= PAR_ROWS)
    for (int64_t t = 0; t < T; ++t) rmsnorm_row(x, wf, out, t, D, eps, bf);
}

/* v (hd, float32, in the model dtype's values) at position p, in place: v*cos + rotate_half(v)*sin, with
 * rotate_half(v) = (-v[hd/2:], v[:hd/2]); c, s: the position's cos/sin rows in float32. */
static void rope(float *v, const float *c, const float *s, int hd, int bf) {
    const int half = hd / 2;
    float a[hd], b[hd];
    for (int d = 0; d < half; ++d) {
        a[d] = v[d] * c[d];
        b[d] = -v[d + half] * s[d];
        a[d + half] = v[d + half] * c[d + half];
        b[d + half] = v[d] * s[d + half];
    }
    round_row(a, hd, bf);
    round_row(b, hd, bf);
    for (int d = 0; d < hd; ++d) v[d] = a[d] + b[d];
}

#if KVSERVE_AVX512BW
/* 16 lanes of a row in the model dtype at element ofs, as float32; and back (kvmath.h's load16 / store16). */
static inline __m512 ld16(const void *p, int64_t ofs, int bf) { return load16((const char *)p + ofs * (bf ? 2 : 4), 0xffff, bf); }

static inline void st16(void *p, int64_t ofs, __m512 v, int bf) { store16((char *)p + ofs * (bf ? 2 : 4), v, 0xffff, bf); }

/* rope() of one head read from src[so..] and written to dst[dof..] in the model dtype, 16 lanes at a time
 * (hd % 32 == 0): the same products, roundings and sums per element. cs, sn: the position's table rows. */
static void rope16(const void *src, int64_t so, void *dst, int64_t dof, const void *cs, const void *sn, int64_t co,
                   int hd, int bf) {
    const int half = hd / 2;
    const __m512i sign = _mm512_set1_epi32(INT32_MIN);
    for (int j = 0; j < half; j += 16) {
        const __m512 lo = ld16(src, so + j, bf), hi = ld16(src, so + half + j, bf);
        const __m512 neg_hi = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(hi), sign));
        __m512 a_lo = _mm512_mul_ps(lo, ld16(cs, co + j, bf)), b_lo = _mm512_mul_ps(neg_hi, ld16(sn, co + j, bf));
        __m512 a_hi = _mm512_mul_ps(hi, ld16(cs, co + half + j, bf));
        __m512 b_hi = _mm512_mul_ps(lo, ld16(sn, co + half + j, bf));
        if (bf) a_lo = round_bf16(a_lo), b_lo = round_bf16(b_lo), a_hi = round_bf16(a_hi), b_hi = round_bf16(b_hi);
        st16(dst, dof + j, _mm512_add_ps(a_lo, b_lo), bf);
        st16(dst, dof + half + j, _mm512_add_ps(a_hi, b_hi), bf);
    }
}
#endif

/* RoPE of one token's H query heads (qkv[row..] -> q[qo..]) and KVH key heads (-> kv[ko + i * kstride]), in
 * the model dtype; co: the position's offset in the cos/sin tables. */
static void rope_token(const void *qkv, int64_t row, void *q, int64_t qo, void *kv, int64_t ko, int64_t kstride,
                       const void *cs, const void *sn, int64_t co, int H, int KVH, int hd, int bf) {
#if KVSERVE_AVX512BW
    if (hd % 32 == 0) { /* in registers */
        for (int i = 0; i < H; ++i) rope16(qkv, row + (int64_t)i * hd, q, qo + (int64_t)i * hd, cs, sn, co, hd, bf);
        for (int i = 0; i < KVH; ++i) rope16(qkv, row + (int64_t)(H + i) * hd, kv, ko + i * kstride, cs, sn, co, hd, bf);
        return;
    }
#endif
    float c[hd], s[hd], v[hd];
    load_row(cs, co, hd, bf, c);
    load_row(sn, co, hd, bf, s);
    for (int i = 0; i < H + KVH; ++i) { /* query heads, then key heads (into the cache) */
        load_row(qkv, row + (int64_t)i * hd, hd, bf, v);
        rope(v, c, s, hd, bf);
        if (i < H)
            store_row(q, qo + (int64_t)i * hd, hd, bf, v);
        else
            store_row(kv, ko + (i - H) * kstride, hd, bf, v);
    }
}

int64_t kvserve_llama_layer_scratch(int64_t T, int64_t D, int H, int KVH, int hd, int64_t inter, int bf) {
    const int64_t e = bf ? 2 : 4, qkv = (int64_t)(H + 2 * KVH) * hd;
    return T * (D * e + qkv * e + (int64_t)H * hd * (e + 4) + inter * e);
}

/* x: (T, D) residual stream in the model dtype, updated in place; cos/sin: (max_len, hd); pos, slots: (T,);
 * gu_p: gate_up from kvserve_pack_swiglu; kv: this layer's (2, KVH, nb, bs, hd) cache; tables/segs as
 * kvserve_paged_attention's. Returns 0, or -1 when the attention's scratch memory could not be allocated. */
int kvserve_llama_layer(void *x, int64_t T, int64_t D, int bf, const void *in_norm, const void *post_norm, float eps,
                        const void *qkv_p, const void *qkv_bias, const void *o_p, const void *gu_p, int64_t inter,
                        const void *down_p, const void *cs, const void *sn, const int64_t *pos, const int64_t *slots,
                        void *kv, const int32_t *tables, int max_blocks, const int32_t *segs, int nseg, int H,
                        int KVH, int64_t nb, int bs, int hd, float scale, int tile, int nt, void *work) {
    const int64_t e = bf ? 2 : 4, nqkv = (int64_t)(H + 2 * KVH) * hd, qd = (int64_t)H * hd;
    char *w = (char *)work;
    void *h = w;
    void *qkv = w + T * D * e;
    void *q = (char *)qkv + T * nqkv * e;
    float *att = (float *)((char *)q + T * qd * e);
    void *act = (char *)att + T * qd * 4;

    double t = timing ? omp_get_wtime() : 0.0;
    kvserve_rmsnorm(x, in_norm, h, T, D, eps, bf, nt);
    lap(0, &t);
    if (linear(bf, h, T, D, qkv_p, nqkv, qkv_bias, NULL, qkv, 0, nt)) return -1;
    lap(1, &t);
#pragma omp parallel for schedule(static) num_threads(nt) if (T >= PAR_ROWS)
    for (int64_t t = 0; t < T; ++t) {
        const int64_t row = t * nqkv, p = pos[t], slot = slots[t];
        rope_token(qkv, row, q, t * qd, kv, slot * hd, nb * bs * hd, cs, sn, p * hd, H, KVH, hd, bf);
        for (int g = 0; g < KVH; ++g) {
            const int64_t vofs = ((int64_t)(KVH + g) * nb * bs + slot) * hd;
            memcpy((char *)kv + vofs * e, (char *)qkv + (row + qd + (int64_t)(KVH + g) * hd) * e, (size_t)hd * e);
        }
    }
    lap(2, &t);
    if (kvserve_paged_attention(q, scale, kv, bf, tables, max_blocks, segs, nseg, pos, att, H, KVH, nb, bs, hd, tile,
                                nt))
        return -1;
    const void *a = att;
    if (bf) { /* the attention output rounded to bf16, into q's buffer (q is no longer needed) */
        for (int64_t i = 0; i < T * qd; ++i) ((uint16_t *)q)[i] = f32_to_bf16(att[i]);
        a = q;
    }
    lap(3, &t); /* with the rounding of its output */
    if (linear(bf, a, T, qd, o_p, D, NULL, x, x, 0, nt)) return -1;
    lap(4, &t);
    kvserve_rmsnorm(x, post_norm, h, T, D, eps, bf, nt);
    lap(0, &t);
    if (linear(bf, h, T, D, gu_p, 2 * inter, NULL, NULL, act, inter, nt)) /* gate_up, SwiGLU in its epilogue */
        return -1;
    lap(5, &t);
    if (linear(bf, act, T, inter, down_p, D, NULL, x, x, 0, nt)) return -1;
    lap(6, &t);
    return 0;
}

/* Every layer in one call: ptrs holds, per layer, (input norm, post norm, qkv, qkv bias or 0, o_proj, gate_up,
 * down), each linear as the address of its weight descriptor (linear.c's WeightDesc); layer l's cache is at kv + l * kv_layer_bytes. Returns 0 or -1. */
int kvserve_llama_layers(int n_layers, const int64_t *ptrs, void *x, int64_t T, int64_t D, int bf, float eps,
                         int64_t inter, const void *cs, const void *sn, const int64_t *pos, const int64_t *slots,
                         void *kv, int64_t kv_layer_bytes, const int32_t *tables, int max_blocks, const int32_t *segs,
                         int nseg, int H, int KVH, int64_t nb, int bs, int hd, float scale, int tile, int nt,
                         void *work) {
    for (int l = 0; l < n_layers; ++l) {
        const int64_t *p = ptrs + 7 * l;
#define P(i) ((const void *)(intptr_t)p[i])
        if (kvserve_llama_layer(x, T, D, bf, P(0), P(1), eps, P(2), P(3), P(4), P(5), inter, P(6), cs, sn, pos, slots,
                                (char *)kv + l * kv_layer_bytes, tables, max_blocks, segs, nseg, H, KVH, nb, bs, hd,
                                scale, tile, nt, work))
            return -1;
#undef P
    }
    return 0;
}
