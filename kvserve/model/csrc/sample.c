/* Greedy sampling's argmax over float32 logits, rows in parallel: torch.argmax over a batch's (rows, vocab)
 * logits runs on one thread at about one element per cycle (0.47 ms for 32 rows of 49,152 here, 3% of a
 * batch-32 decode step).
 *
 * Same answer as torch.argmax(dim=-1): the index of the first largest value. A row holding a NaN gets -1 and
 * the caller asks torch instead (torch ranks NaN above everything). */
#include <math.h>
#include <stdint.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

static int64_t argmax_row(const float *v, int64_t n) {
    float m = -INFINITY;
    int64_t i = 0;
#ifdef __AVX512F__
    __m512 vm = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(v + i);
        nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        vm = _mm512_max_ps(vm, x);
    }
    if (nan) return -1;
    m = _mm512_reduce_max_ps(vm);
#endif
    for (; i < n; ++i) {
        if (v[i] != v[i]) return -1;
        m = v[i] > m ? v[i] : m;
    }
    i = 0;
#ifdef __AVX512F__
    const __m512 target = _mm512_set1_ps(m);
    for (; i + 16 <= n; i += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(v + i), target, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz((unsigned)hit);
    }
#endif
    for (; i < n; ++i)
        if (v[i] == m) return i;
    return 0; /* unreachable: m is one of the values (n > 0) */
}

/* x: (rows, n) float32, row stride n, n > 0 -> out[r] = argmax of row r, or -1 where the row holds a NaN. */
void kvserve_argmax_rows(const float *x, int64_t rows, int64_t n, int64_t *out, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt) if (rows >= 4)
    for (int64_t r = 0; r < rows; ++r) out[r] = argmax_row(x + r * n, n);
}
