/* Drives every exported CPU kernel of kvserve/model/csrc over awkward shapes with buffers allocated at their
 * exact sizes, for a build under AddressSanitizer (tests/unit/test_kernels_sanitized.py): any read or write
 * past a buffer, any use of freed memory, is reported and fails the test. Numbers are checked elsewhere
 * (tests/unit/test_native_*.py); this only has to touch every path.
 *
 * Shapes: block sizes 1..32 (blocks shorter and longer than the kernel's 16-key blocks), sequences whose
 * block tables end exactly at their last block, decode and prefill segments in one call, linears with
 * partial 48-column panels, SwiGLU packs with partial and sub-panel widths, argmax rows of every length
 * class, and one fused layer call with an exactly sized scratch. Exits 0 when done (ASan aborts earlier).
 *
 * ASan does not check AVX-512 masked loads and stores, so the kernels that end rows with masks (RMSNorm, the
 * SwiGLU epilogue) also run on buffers that end at, or start right after, an inaccessible page: a lane
 * outside its mask that touched memory would fault there. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int kvserve_attention_features(void);
int kvserve_linear_features(void);
int kvserve_linear_panel_width(void);
int kvserve_paged_attention(const void *q, float scale, const void *kv, int is_bf16, const int32_t *tables,
                            int max_blocks, const int32_t *segs, int num_segs, const int64_t *pos, float *out, int H,
                            int KVH, int64_t nb, int bs, int hd, int tile, int nthreads);
void kvserve_pack_f32(const float *W, int64_t N, int64_t K, float *out);
void kvserve_pack_bf16(const uint16_t *W, int64_t N, int64_t K, uint16_t *out);
void kvserve_linear_f32(const float *x, int64_t ldx, int64_t M, int64_t K, const float *wp, int64_t N,
                        const float *bias, const float *res, float *y, int nthreads);
void kvserve_linear_bf16(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *wp, int64_t N,
                         const uint16_t *bias, const uint16_t *res, uint16_t *y, int nthreads);
int64_t kvserve_swiglu_panels(int64_t inter);
void kvserve_pack_swiglu(int bf, const void *W, int64_t inter, int64_t K, void *out);
void kvserve_linear_swiglu(int bf, const void *x, int64_t ldx, int64_t M, int64_t K, const void *wp, int64_t inter,
                           void *act, int nthreads);
void kvserve_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out, int nt);
void kvserve_rmsnorm(const void *x, const void *w, void *out, int64_t T, int64_t D, float eps, int bf, int nt);
int64_t kvserve_llama_layer_scratch(int64_t T, int64_t D, int H, int KVH, int hd, int64_t inter, int bf);
int kvserve_llama_layers(int n_layers, const int64_t *ptrs, void *x, int64_t T, int64_t D, int bf, float eps,
                         int64_t inter, const void *cs, const void *sn, const int64_t *pos, const int64_t *slots,
                         void *kv, int64_t kv_layer_bytes, const int32_t *tables, int max_blocks, const int32_t *segs,
                         int nseg, int H, int KVH, int64_t nb, int bs, int hd, float scale, int tile, int nt,
                         void *work);

static uint64_t rng = 88172645463325252ull;
static float rnd(void) { /* in [-1, 1) */
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

/* n random elements of e bytes (4: float32, 2: bf16 = a float's top half), exactly n * e bytes. */
static void *rand_buf(int64_t n, int e) {
    void *p = malloc((size_t)(n > 0 ? n : 1) * e);
    for (int64_t i = 0; i < n; ++i) {
        float f = rnd();
        if (e == 4) {
            ((float *)p)[i] = f;
        } else {
            uint32_t u;
            memcpy(&u, &f, 4);
            ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        }
    }
    return p;
}

/* One attention call: sequences of the given lengths (tokens already cached + new tokens), each with a block
 * table exactly as long as it needs, in one (S, max_blocks) array sized to the longest. share: the first
 * `share` blocks of every table are the same cache blocks (a shared prompt: the kernel's grouped items). */
static void attention(int bf, int bs, int S, const int *cached, const int *fresh, int tile, int share) {
    const int H = 4, KVH = 2, hd = 64, e = bf ? 2 : 4;
    int max_blocks = 1, T = 0;
    for (int s = 0; s < S; ++s) {
        const int blocks = (cached[s] + fresh[s] + bs - 1) / bs;
        max_blocks = blocks > max_blocks ? blocks : max_blocks;
        T += fresh[s];
    }
    const int64_t nb = (int64_t)S * max_blocks;
    void *kv = rand_buf(2 * KVH * nb * bs * hd, e);
    int32_t *tables = malloc(sizeof(int32_t) * (size_t)S * max_blocks);
    int32_t *segs = malloc(sizeof(int32_t) * 2 * (size_t)S);
    int64_t *pos = malloc(sizeof(int64_t) * (size_t)T);
    int row = 0;
    for (int s = 0; s < S; ++s) {
        for (int b = 0; b < max_blocks; ++b) /* scattered, but for the shared blocks */
            tables[s * max_blocks + b] = (int32_t)((b * S + (b < share ? 0 : s)) % nb);
        segs[2 * s] = row, segs[2 * s + 1] = fresh[s];
        for (int t = 0; t < fresh[s]; ++t) pos[row++] = cached[s] + t;
    }
    void *q = rand_buf((int64_t)T * H * hd, e);
    float *out = malloc(sizeof(float) * (size_t)T * H * hd);
    if (kvserve_paged_attention(q, 0.125f, kv, bf, tables, max_blocks, segs, S, pos, out, H, KVH, nb, bs, hd, tile, 2))
        exit(2);
    free(kv), free(tables), free(segs), free(pos), free(q), free(out);
}

static int64_t panels(int64_t n) { return (n + kvserve_linear_panel_width() - 1) / kvserve_linear_panel_width(); }

static void linear(int bf, int64_t M, int64_t N, int64_t K) {
    const int e = bf ? 2 : 4;
    void *W = rand_buf(N * K, e), *x = rand_buf(M * K, e), *bias = rand_buf(N, e), *res = rand_buf(M * N, e);
    void *wp = malloc((size_t)(panels(N) * kvserve_linear_panel_width() * K * e));
    void *y = malloc((size_t)(M * N * e));
    if (bf) {
        kvserve_pack_bf16(W, N, K, wp);
        kvserve_linear_bf16(x, K, M, K, wp, N, bias, res, y, 2);
        kvserve_linear_bf16(x, K, M, K, wp, N, NULL, y, y, 2); /* residual in place */
    } else {
        kvserve_pack_f32(W, N, K, wp);
        kvserve_linear_f32(x, K, M, K, wp, N, bias, res, y, 2);
        kvserve_linear_f32(x, K, M, K, wp, N, NULL, y, y, 2);
    }
    free(W), free(x), free(bias), free(res), free(wp), free(y);
}

static void swiglu(int bf, int64_t M, int64_t inter, int64_t K) {
    const int e = bf ? 2 : 4;
    void *W = rand_buf(2 * inter * K, e), *x = rand_buf(M * K, e);
    void *wp = malloc((size_t)(kvserve_swiglu_panels(inter) * kvserve_linear_panel_width() * K * e));
    void *act = malloc((size_t)(M * inter * e));
    kvserve_pack_swiglu(bf, W, inter, K, wp);
    kvserve_linear_swiglu(bf, x, K, M, K, wp, inter, act, 2);
    free(W), free(x), free(wp), free(act);
}

static void argmax(int64_t rows, int64_t n) {
    float *x = rand_buf(rows * n, 4);
    int64_t *out = malloc(sizeof(int64_t) * (size_t)rows);
    kvserve_argmax_rows(x, rows, n, out, 2);
    for (int64_t r = 0; r < rows; ++r)
        if (out[r] < 0 || out[r] >= n) exit(3);
    free(x), free(out);
}

/* One fused call over 2 layers: a 5-token decode-like sequence and a 21-token prefill, with block size bs. */
static void layers(int bf, int bs) {
    const int L = 2, H = 4, KVH = 2, hd = 64, e = bf ? 2 : 4, NR = kvserve_linear_panel_width();
    const int64_t D = 136, inter = 100, nqkv = (int64_t)(H + 2 * KVH) * hd, max_len = 64;
    const int S = 2, fresh[2] = {1, 21}, cached[2] = {4, 0};
    const int T = fresh[0] + fresh[1];
    int max_blocks = 1;
    for (int s = 0; s < S; ++s) {
        const int blocks = (cached[s] + fresh[s] + bs - 1) / bs;
        max_blocks = blocks > max_blocks ? blocks : max_blocks;
    }
    const int64_t nb = (int64_t)S * max_blocks, kv_layer = 2 * KVH * nb * bs * hd * e;
    int32_t *tables = malloc(sizeof(int32_t) * (size_t)S * max_blocks), segs[4];
    int64_t *pos = malloc(sizeof(int64_t) * T), *slots = malloc(sizeof(int64_t) * T);
    int row = 0;
    for (int s = 0; s < S; ++s) {
        for (int b = 0; b < max_blocks; ++b) tables[s * max_blocks + b] = (int32_t)(s * max_blocks + b);
        segs[2 * s] = row, segs[2 * s + 1] = fresh[s];
        for (int t = 0; t < fresh[s]; ++t, ++row) {
            pos[row] = cached[s] + t;
            slots[row] = (int64_t)tables[s * max_blocks + pos[row] / bs] * bs + pos[row] % bs;
        }
    }
    void *kv = rand_buf(L * kv_layer / e, e), *x = rand_buf(T * D, e);
    void *cs = rand_buf(max_len * hd, e), *sn = rand_buf(max_len * hd, e);
    int64_t ptrs[2 * 7];
    void *owned[2 * 7];
    int n_owned = 0;
    for (int l = 0; l < L; ++l) {
        const int64_t shapes[4][2] = {{nqkv, D}, {D, H * hd}, {2 * inter, D}, {D, inter}};
        void *packed[4];
        for (int w = 0; w < 4; ++w) {
            const int64_t N = shapes[w][0], K = shapes[w][1];
            void *W = rand_buf(N * K, e);
            const int64_t np = w == 2 ? kvserve_swiglu_panels(inter) : panels(N);
            packed[w] = malloc((size_t)(np * NR * K * e));
            if (w == 2)
                kvserve_pack_swiglu(bf, W, inter, K, packed[w]);
            else if (bf)
                kvserve_pack_bf16(W, N, K, packed[w]);
            else
                kvserve_pack_f32(W, N, K, packed[w]);
            free(W);
            owned[n_owned++] = packed[w];
        }
        void *in_norm = rand_buf(D, e), *post_norm = rand_buf(D, e), *bias = rand_buf(nqkv, e);
        owned[n_owned++] = in_norm, owned[n_owned++] = post_norm, owned[n_owned++] = bias;
        const void *p[7] = {in_norm, post_norm, packed[0], l ? NULL : bias, packed[1], packed[2], packed[3]};
        for (int i = 0; i < 7; ++i) ptrs[7 * l + i] = (int64_t)(intptr_t)p[i];
    }
    void *work = malloc((size_t)kvserve_llama_layer_scratch(T, D, H, KVH, hd, inter, bf));
    if (kvserve_llama_layers(L, ptrs, x, T, D, bf, 1e-5f, inter, cs, sn, pos, slots, kv, kv_layer, tables, max_blocks,
                             segs, S, H, KVH, nb, bs, hd, 0.125f, 8, 2, work))
        exit(2);
    for (int i = 0; i < n_owned; ++i) free(owned[i]);
    free(tables), free(pos), free(slots), free(kv), free(x), free(cs), free(sn), free(work);
}

/* n bytes right before (at_end) or right after an inaccessible page, random contents; guard_free releases it. */
static void *guard_buf(int64_t n, int at_end) {
    const int64_t page = 4096, len = (n + page - 1) / page * page;
    char *base = mmap(NULL, (size_t)(len + page), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) abort();
    if (mprotect(at_end ? base + len : base, (size_t)page, PROT_NONE)) abort();
    char *p = at_end ? base + len - n : base + page;
    for (int64_t i = 0; i < n; ++i) p[i] = (char)(0x3c + i % 7); /* small finite numbers in either dtype */
    return p;
}

static void guard_free(void *p, int64_t n, int at_end) {
    const int64_t page = 4096, len = (n + page - 1) / page * page;
    munmap(at_end ? (char *)p + n - len : (char *)p - page, (size_t)(len + page));
}

static void guarded(int bf) {
    const int e = bf ? 2 : 4;
    for (int at_end = 0; at_end < 2; ++at_end) {
        for (int64_t D = 1; D <= 40; ++D) { /* every tail of a 16-lane vector, and a few whole ones */
            const int64_t T = 3;
            void *x = guard_buf(T * D * e, at_end), *w = guard_buf(D * e, at_end), *o = guard_buf(T * D * e, at_end);
            kvserve_rmsnorm(x, w, o, T, D, 1e-5f, bf, 1);
            guard_free(x, T * D * e, at_end), guard_free(w, D * e, at_end), guard_free(o, T * D * e, at_end);
        }
        const int64_t K = 34;
        for (int64_t inter = 1; inter <= 30; ++inter) /* sub-panel, partial and whole SwiGLU panels */
            for (int64_t M = 1; M <= 9; M += 4) {     /* row pairs with and without a lone last row */
                void *W = rand_buf(2 * inter * K, e);
                const int64_t np = kvserve_swiglu_panels(inter) * K * kvserve_linear_panel_width();
                void *wp = guard_buf(np * e, at_end), *x = guard_buf(M * K * e, at_end);
                void *act = guard_buf(M * inter * e, at_end);
                kvserve_pack_swiglu(bf, W, inter, K, wp);
                kvserve_linear_swiglu(bf, x, K, M, K, wp, inter, act, 1);
                free(W);
                guard_free(wp, np * e, at_end), guard_free(x, M * K * e, at_end);
                guard_free(act, M * inter * e, at_end);
            }
    }
}

int main(void) {
    const int has_linear = kvserve_linear_features(), bf16_attention = kvserve_attention_features();
    const int block_sizes[] = {1, 4, 8, 16, 32};
    for (int bf = 0; bf < 2; ++bf)
        for (int i = 0; i < 5; ++i) {
            const int bs = block_sizes[i];
            const int cached[4] = {0, 7, 40, 100}, fresh[4] = {1, 1, 17, 70}; /* decode rows and prefill chunks */
            attention(bf, bs, 4, cached, fresh, 64, 0);
            attention(bf, bs, 4, cached, fresh, 8, 0);
            const int one_cached[1] = {130}, one_fresh[1] = {1};
            attention(bf, bs, 1, one_cached, one_fresh, 64, 0);
            /* 40 decodes and two short suffixes over a shared 300-key prompt: grouped, cut into chunks */
            int many_cached[42], many_fresh[42];
            for (int s = 0; s < 42; ++s) many_cached[s] = 300 + s % 5, many_fresh[s] = s < 40 ? 1 : 9;
            attention(bf, bs, 42, many_cached, many_fresh, 64, 300 / bs);
            attention(bf, bs, 42, many_cached, many_fresh, 8, 300 / bs);
        }
    (void)bf16_attention;
    for (int bf = 0; bf < 2; ++bf) {
        if (!(has_linear & (bf ? 2 : 1))) continue;
        const int64_t rows[] = {1, 7, 9, 65};
        for (int r = 0; r < 4; ++r) {
            linear(bf, rows[r], 100, 34);
            linear(bf, rows[r], 48, 64);
            const int64_t widths[] = {1, 5, 24, 25, 100};
            for (int w = 0; w < 5; ++w) swiglu(bf, rows[r], widths[w], 34);
        }
        for (int i = 0; i < 5; ++i) layers(bf, block_sizes[i]);
        guarded(bf);
    }
    const int64_t lengths[] = {1, 15, 16, 17, 100};
    for (int i = 0; i < 5; ++i) argmax(3, lengths[i]);
    printf("sanitized kernels: done\n");
    return 0;
}
