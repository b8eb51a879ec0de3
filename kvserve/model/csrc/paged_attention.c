/* Paged attention for CPUs, fused: reads K/V straight from the paged cache, float32 math, one fixed order.
 *
 * Every query row (token t, query head) is computed from its own inputs only: its query, its position p
 * and the keys/values at positions 0..p of its sequence, taken in 16-key blocks 0..p/16 in order. Scores
 * are fused multiply-adds over head_dim in order; the row max is exact; exp(score - max) is a fixed
 * polynomial; the exp sums are kept in 16 lanes (lane = key mod 16), added block after block and folded in
 * lane order at the end; P.V is a fused multiply-add per key, in key order. Keys past p inside the row's last
 * block add exact zeros. Nothing depends on the other rows in the call, on how tokens are tiled, on the
 * thread that runs them, or on where the blocks live, so a row gets the same bits in any batch, chunking or
 * cache state (tests/model/test_golden.py checks this end to end).
 *
 * Built at first use by kvserve/model/native.py (gcc -O3 -march=native -ffp-contract=off): with contraction
 * off, every fused multiply-add is an explicit fmaf, so vectorised and scalar code give the same bits.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KB 16

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* x[i] = exp(x[i] - m) for i < n (x[i] <= m), exactly 0 below -87 (and for -inf): Cephes' expf polynomial,
 * about 1 ulp. Straight-line lane code, so the compiler vectorises it. */
static void exp_shifted(float *restrict x, int n, float m) {
    for (int j = 0; j < n; ++j) {
        float d = x[j] - m;
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
        x[j] = d < -87.0f ? 0.0f : q * scale;
    }
}

typedef struct {
    int32_t row_start; /* first token of the tile in the flat batch */
    int32_t ntok;      /* tokens in the tile */
    int32_t seq;       /* row of the block table */
    int32_t kv_head;
} Item;

/* One tile of tokens of one sequence against one KV head: rows = ntok * G query heads. */
static void attend_item(const Item *it, const float *q, const void *kv, int is_bf16, const int32_t *tables,
                        int max_blocks, const int64_t *pos, float *out, int H, int G, int KVH, int64_t nb, int bs,
                        int hd, float *buf) {
    const int nrows = it->ntok * G;
    const int64_t maxpos = pos[it->row_start + it->ntok - 1];
    const int nblk = (int)(maxpos / KB) + 1;
    const int width = nblk * KB;
    float *scores = buf;                       /* nrows * width */
    float *kt = scores + (size_t)nrows * width; /* hd * KB */
    float *vb = kt + (size_t)hd * KB;          /* KB * hd */
    float *acc = vb + (size_t)KB * hd;         /* nrows * hd */
    float *lanes = acc + (size_t)nrows * hd;   /* nrows * KB */
    float *rmax = lanes + (size_t)nrows * KB;  /* nrows */
    const int32_t *table = tables + (size_t)it->seq * max_blocks;
    const int64_t head_stride = nb * bs * hd; /* elements between heads in the cache */
    const int64_t kofs = (int64_t)it->kv_head * head_stride;
    const int64_t vofs = ((int64_t)KVH + it->kv_head) * head_stride;
    const float *qrow[nrows > 0 ? nrows : 1];
    int last[nrows > 0 ? nrows : 1];
    for (int r = 0; r < nrows; ++r) {
        int t = r / G, g = r % G;
        qrow[r] = q + ((int64_t)(it->row_start + t) * H + (int64_t)it->kv_head * G + g) * hd;
        last[r] = (int)(pos[it->row_start + t] / KB);
        rmax[r] = -INFINITY;
    }
    /* pass 1: scores and row max */
    for (int b = 0; b < nblk; ++b) {
        for (int j = 0; j < KB; ++j) {
            int64_t k = (int64_t)b * KB + j;
            if (k <= maxpos) {
                int64_t slot = (int64_t)table[k / bs] * bs + k % bs;
                if (is_bf16) {
                    const uint16_t *src = (const uint16_t *)kv + kofs + slot * hd;
                    for (int d = 0; d < hd; ++d) kt[d * KB + j] = bf16_to_f32(src[d]);
                } else {
                    const float *src = (const float *)kv + kofs + slot * hd;
                    for (int d = 0; d < hd; ++d) kt[d * KB + j] = src[d];
                }
            } else {
                for (int d = 0; d < hd; ++d) kt[d * KB + j] = 0.0f;
            }
        }
        int r = 0;
        for (; r + 4 <= nrows; r += 4) {
            float a0[KB] = {0}, a1[KB] = {0}, a2[KB] = {0}, a3[KB] = {0};
            const float *q0 = qrow[r], *q1 = qrow[r + 1], *q2 = qrow[r + 2], *q3 = qrow[r + 3];
            for (int d = 0; d < hd; ++d) {
                const float *kd = kt + d * KB;
                for (int j = 0; j < KB; ++j) {
                    a0[j] = fmaf(q0[d], kd[j], a0[j]);
                    a1[j] = fmaf(q1[d], kd[j], a1[j]);
                    a2[j] = fmaf(q2[d], kd[j], a2[j]);
                    a3[j] = fmaf(q3[d], kd[j], a3[j]);
                }
            }
            float *as[4] = {a0, a1, a2, a3};
            for (int i = 0; i < 4; ++i) {
                if (b > last[r + i]) continue;
                int64_t p = pos[it->row_start + (r + i) / G];
                float *s = scores + (size_t)(r + i) * width + b * KB;
                for (int j = 0; j < KB; ++j) {
                    float v = ((int64_t)b * KB + j <= p) ? as[i][j] : -INFINITY;
                    s[j] = v;
                    rmax[r + i] = v > rmax[r + i] ? v : rmax[r + i];
                }
            }
        }
        for (; r < nrows; ++r) {
            float a0[KB] = {0};
            const float *q0 = qrow[r];
            for (int d = 0; d < hd; ++d) {
                const float *kd = kt + d * KB;
                for (int j = 0; j < KB; ++j) a0[j] = fmaf(q0[d], kd[j], a0[j]);
            }
            if (b > last[r]) continue;
            int64_t p = pos[it->row_start + r / G];
            float *s = scores + (size_t)r * width + b * KB;
            for (int j = 0; j < KB; ++j) {
                float v = ((int64_t)b * KB + j <= p) ? a0[j] : -INFINITY;
                s[j] = v;
                rmax[r] = v > rmax[r] ? v : rmax[r];
            }
        }
    }
    /* pass 2: exp, lane sums, P.V */
    memset(acc, 0, sizeof(float) * (size_t)nrows * hd);
    memset(lanes, 0, sizeof(float) * (size_t)nrows * KB);
    for (int r = 0; r < nrows; ++r) {
        float *s = scores + (size_t)r * width;
        exp_shifted(s, (last[r] + 1) * KB, rmax[r]);
        for (int b = 0; b <= last[r]; ++b) {
            for (int j = 0; j < KB; ++j) lanes[r * KB + j] += s[b * KB + j];
        }
    }
    for (int b = 0; b < nblk; ++b) {
        for (int j = 0; j < KB; ++j) {
            int64_t k = (int64_t)b * KB + j;
            if (k <= maxpos) {
                int64_t slot = (int64_t)table[k / bs] * bs + k % bs;
                if (is_bf16) {
                    const uint16_t *src = (const uint16_t *)kv + vofs + slot * hd;
                    for (int d = 0; d < hd; ++d) vb[j * hd + d] = bf16_to_f32(src[d]);
                } else {
                    memcpy(vb + j * hd, (const float *)kv + vofs + slot * hd, sizeof(float) * hd);
                }
            } else {
                memset(vb + j * hd, 0, sizeof(float) * hd);
            }
        }
        for (int r = 0; r < nrows; ++r) {
            if (b > last[r]) continue;
            const float *e = scores + (size_t)r * width + b * KB;
            float *o = acc + (size_t)r * hd;
            for (int j = 0; j < KB; ++j) {
                const float w = e[j];
                const float *v = vb + j * hd;
                for (int d = 0; d < hd; ++d) o[d] = fmaf(w, v[d], o[d]);
            }
        }
    }
    for (int r = 0; r < nrows; ++r) {
        float den = 0.0f;
        for (int j = 0; j < KB; ++j) den += lanes[r * KB + j];
        int t = r / G, g = r % G;
        float *dst = out + ((int64_t)(it->row_start + t) * H + (int64_t)it->kv_head * G + g) * hd;
        for (int d = 0; d < hd; ++d) dst[d] = acc[(size_t)r * hd + d] / den;
    }
}

/* q, out: (T, H, hd) float32; kv: (2, KVH, nb, bs, hd) float32 or bfloat16; tables: (S, max_blocks) int32;
 * segs: (S, 2) int32 = (first row, tokens) per sequence, its block table is tables[s]; pos: (T,) int64.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int kvserve_paged_attention(const float *q, const void *kv, int is_bf16, const int32_t *tables, int max_blocks,
                            const int32_t *segs, int num_segs, const int64_t *pos, float *out, int H, int KVH,
                            int64_t nb, int bs, int hd, int tile, int nthreads) {
    const int G = H / KVH;
    int nitems = 0;
    for (int s = 0; s < num_segs; ++s) nitems += ((segs[2 * s + 1] + tile - 1) / tile) * KVH;
    Item *items = (Item *)malloc(sizeof(Item) * (nitems > 0 ? nitems : 1));
    if (!items) return -1;
    int n = 0;
    int64_t max_width = KB;
    for (int s = 0; s < num_segs; ++s) {
        for (int t0 = 0; t0 < segs[2 * s + 1]; t0 += tile) {
            int ntok = segs[2 * s + 1] - t0 < tile ? segs[2 * s + 1] - t0 : tile;
            int64_t w = (pos[segs[2 * s] + t0 + ntok - 1] / KB + 1) * KB;
            if (w > max_width) max_width = w;
            for (int h = 0; h < KVH; ++h) items[n++] = (Item){segs[2 * s] + t0, ntok, s, h};
        }
    }
    const int64_t rows = (int64_t)tile * G;
    const size_t scratch = (size_t)(rows * max_width + 2 * (int64_t)hd * KB + rows * hd + rows * KB + rows);
    int failed = 0;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = (float *)aligned_alloc(64, ((scratch * sizeof(float)) + 63) / 64 * 64);
        if (!buf) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int i = 0; i < nitems; ++i) {
            if (buf) attend_item(&items[i], q, kv, is_bf16, tables, max_blocks, pos, out, H, G, KVH, nb, bs, hd, buf);
        }
        free(buf);
    }
    free(items);
    return failed ? -1 : 0;
}
