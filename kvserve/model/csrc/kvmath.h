/* Scalar helpers shared by kvserve's CPU kernels: bfloat16 conversions and a fixed exp polynomial.
 * Straight-line code, so loops over them vectorise, with the same bits in vector and scalar code. */
#ifndef KVSERVE_KVMATH_H
#define KVSERVE_KVMATH_H
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KVSERVE_AVX512BW 1
#else
#define KVSERVE_AVX512BW 0
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN; branch-free */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

/* exp(d) for d <= 0 (and -inf), exactly 0 below -87: Cephes' expf polynomial, about 1 ulp. */
static inline float exp_nonpos(float d) {
    float v = d < -87.0f ? -87.0f : d; /* not fmaxf: GCC does not vectorise it */
    float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = v - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * (r * r) + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return d < -87.0f ? 0.0f : q * scale;
}

/* v rounded to bfloat16 in place when bf (float32: unchanged). */
static inline void round_row(float *v, int64_t n, int bf) {
    if (bf)
        for (int64_t i = 0; i < n; ++i) v[i] = bf16_to_f32(f32_to_bf16(v[i]));
}

#ifdef __AVX512F__
/* kvmath.h's exp_nonpos in 16 lanes, operation for operation (no contraction), so every lane has the scalar's
 * bits; NaN stays NaN (max with -87 returns its second operand, d, when d is NaN). */
static inline __m512 exp_nonpos16(__m512 d) {
    const __m512 v = _mm512_max_ps(_mm512_set1_ps(-87.0f), d), shift = _mm512_set1_ps(12582912.0f);
    const __m512 k = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)), shift), shift);
    __m512 r = _mm512_sub_ps(v, _mm512_mul_ps(k, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(k, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 q = _mm512_set1_ps(1.9875691500e-4f);
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.3981999507e-3f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(8.3334519073e-3f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(4.1665795894e-2f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(1.6666665459e-1f));
    q = _mm512_add_ps(_mm512_mul_ps(q, r), _mm512_set1_ps(5.0000001201e-1f));
    q = _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(q, _mm512_mul_ps(r, r)), r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(k), _mm512_set1_epi32(127)), 23);
    const __mmask16 under = _mm512_cmp_ps_mask(d, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    return _mm512_maskz_mul_ps((__mmask16)~under, q, _mm512_castsi512_ps(bits));
}

/* Round to nearest even, as f32_to_bf16 (NaN stays NaN), lane by lane: the bf16 bits in each lane's low half. */
static inline __m512i round_bf16_bits(__m512 a) {
    const __m512i u = _mm512_castps_si512(a);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
}

static inline __m512 round_bf16(__m512 a) { return _mm512_castsi512_ps(_mm512_slli_epi32(round_bf16_bits(a), 16)); }

/* 16 float32 lanes stored at p in the model dtype (bf: bfloat16, rounded as f32_to_bf16; else float32) under
 * mask mk. */
static inline void store16(void *p, __m512 v, __mmask16 mk, int bf) {
    if (!bf) {
        _mm512_mask_storeu_ps(p, mk, v);
        return;
    }
#if KVSERVE_AVX512BW
    _mm256_mask_storeu_epi16(p, mk, _mm512_cvtepi32_epi16(round_bf16_bits(v)));
#else
    uint16_t h[16];
    _mm256_storeu_si256((__m256i *)h, _mm512_cvtepi32_epi16(round_bf16_bits(v)));
    for (int j = 0; j < 16; ++j)
        if (mk >> j & 1) ((uint16_t *)p)[j] = h[j];
#endif
}
#endif

#if KVSERVE_AVX512BW
/* 16 lanes of a row in the model dtype at p as float32, lanes outside mk read as 0. */
static inline __m512 bf16x16_to_f32(const uint16_t *p, __mmask16 mk) {
    __m256i h = _mm256_maskz_loadu_epi16(mk, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 load16(const void *p, __mmask16 mk, int bf) {
    return bf ? bf16x16_to_f32((const uint16_t *)p, mk) : _mm512_maskz_loadu_ps(mk, (const float *)p);
}
#endif

/* Asks for the 64-byte line at p to be brought into the L1 cache; changes no number. An asm statement: GCC 12
 * (-O1 and up) deleted __builtin_prefetch / _mm_prefetch calls whose address it computed from a load (a block
 * table entry) as dead code, so the attention kernel's prefetches never ran; -fno-tree-dce kept them. */
static inline void prefetch_line(const void *p) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("prefetcht0 %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 0, 3);
#endif
}

/* CALL(R) with R the compile-time constant equal to n (1..8, or 1..3; other n: nothing), so micro-kernels
 * written for a constant row count R unroll their row loops. */
#define KVSERVE_ROWS8(n, CALL)      \
    switch (n) {                    \
    case 8: CALL(8); break;         \
    case 7: CALL(7); break;         \
    case 6: CALL(6); break;         \
    case 5: CALL(5); break;         \
    case 4: CALL(4); break;         \
    default: KVSERVE_ROWS3(n, CALL) \
    }
#define KVSERVE_ROWS3(n, CALL) \
    switch (n) {               \
    case 3: CALL(3); break;    \
    case 2: CALL(2); break;    \
    case 1: CALL(1); break;    \
    default: break;            \
    }
#endif
