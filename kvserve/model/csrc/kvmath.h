/* Scalar helpers shared by kvserve's CPU kernels: bfloat16 conversions and a fixed exp polynomial.
 * Straight-line code, so loops over them vectorise, with the same bits in vector and scalar code. */
#ifndef KVSERVE_KVMATH_H
#define KVSERVE_KVMATH_H
#include <stdint.h>
#include <string.h>

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

/* act = round(silu(g)) * u over n features (g, u, act float32 arrays; round: to bf16 when bf), as Hugging
 * Face's `act_fn(gate) * up` rounds in the model dtype. silu(g) = g / (1 + exp(-g)) from exp(-|g|). */
static inline void swiglu(const float *g, const float *u, float *act, int64_t n, int bf) {
    for (int64_t i = 0; i < n; ++i) {
        const float en = exp_nonpos(g[i] < 0 ? g[i] : -g[i]); /* exp(-|g|) */
        const float num = g[i] >= 0 ? g[i] : g[i] * en;
        act[i] = num / (1.0f + en);
    }
    round_row(act, n, bf);
    for (int64_t i = 0; i < n; ++i) act[i] = act[i] * u[i];
}

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
