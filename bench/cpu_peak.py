"""This CPU's peak multiply-add rate (float32 FMA, bf16 VDPBF16PS) and read bandwidth, one thread and all.

    .venv/bin/python bench/cpu_peak.py [--seconds 1.0]

Builds a tiny C loop (24 independent accumulators, no memory traffic) with the system compiler, as
kvserve/model/native.py builds the kernels, and runs it on 1 and on every OpenMP thread. The result bounds
what any kernel can reach here: the README uses it for the warm-TTFT and batch-32 decode arguments of issue 3
(attention and linears are multiply-add bound, so a ratio of FLOP counts over this rate is a floor on time),
and bench/decode_attention.py for the floor of attention over a long context (max of its FLOPs over the
peak and its KV bytes over the read bandwidth: a 1 GiB buffer summed with 512-bit loads, best pass).
A third line runs the bf16 linear kernel's micro-tile (a copy of csrc/linear.c's inner loop, built with
the kernels' flags) with its weights in cache, one thread: how close the inner loop itself comes to the
peak, so what a whole linear loses beyond it is the weights' streaming, the tile edges and the threads'
hand-offs, not the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
/* GFLOP/s of n accumulators' worth of independent multiply-adds, per thread, summed over threads. */
static double run(int bf, int threads, double seconds) {
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        __m512 acc[24];
        for (int i = 0; i < 24; i++) acc[i] = _mm512_set1_ps(0.0f);
        __m512 a = _mm512_set1_ps(1e-8f), b = _mm512_set1_ps(1e-8f);
        long iters = 0;
        double t0 = omp_get_wtime(), t = t0;
        while (t - t0 < seconds) {
            for (int r = 0; r < 10000; r++) {
                if (bf) {
#pragma GCC unroll 24
                    for (int j = 0; j < 24; j++) acc[j] = _mm512_dpbf16_ps(acc[j], (__m512bh)a, (__m512bh)b);
                } else {
#pragma GCC unroll 24
                    for (int j = 0; j < 24; j++) acc[j] = _mm512_fmadd_ps(a, b, acc[j]);
                }
                __asm__ volatile("" : "+v"(a));
            }
            iters += 10000;
            t = omp_get_wtime();
        }
        float s = 0;
        for (int j = 0; j < 24; j++) s += _mm512_reduce_add_ps(acc[j]);
        if (s == 12345.0f) printf("%f\n", s); /* keeps the loop */
        total = iters * 24.0 * (bf ? 64 : 32) / (t - t0) / 1e9;
    }
    return total;
}
/* The bf16 linear kernel's micro-tile as kvserve/model/csrc/linear.c has it (8 rows x 48 columns, 24
 * accumulators; per pair of k: 3 weight loads, 8 broadcasts, 24 VDPBF16PS), over 4 panels of K = 576 that stay
 * in L1/L2: what the inner loop reaches when the weights are in cache. */
#define NR 48
__attribute__((noinline)) static void tile(const uint16_t *x, long K, const uint16_t *wp, float *out) {
    __m512 acc[8][3];
    for (int m = 0; m < 8; ++m) acc[m][0] = acc[m][1] = acc[m][2] = _mm512_setzero_ps();
    for (long k = 0; k < K; k += 2) {
        const uint16_t *w = wp + k * NR;
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32),
                 w2 = (__m512bh)_mm512_loadu_si512(w + 64);
        for (int m = 0; m < 8; ++m) {
            int32_t pair;
            memcpy(&pair, x + m * K + k, 4);
            __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xb, w2);
        }
    }
    for (int m = 0; m < 8; ++m)
        for (int j = 0; j < 3; j++) _mm512_storeu_ps(out + m * 48 + j * 16, acc[m][j]);
}
static double tile_rate(double seconds) {
    const long K = 576, panels = 4;
    uint16_t *x = aligned_alloc(64, 8 * K * 2), *w = aligned_alloc(64, panels * K * NR * 2);
    for (long i = 0; i < 8 * K; i++) x[i] = 0x3f80;
    for (long i = 0; i < panels * K * NR; i++) w[i] = 0x3f80;
    float out[8 * 48], sum = 0;
    long calls = 0;
    double t0 = omp_get_wtime(), t = t0;
    while (t - t0 < seconds) {
        for (int r = 0; r < 1000; r++) {
            tile(x, K, w + (calls % panels) * K * NR, out);
            sum += out[calls++ % 384];
            __asm__ volatile("" ::: "memory");
        }
        t = omp_get_wtime();
    }
    if (sum == 12345.0f) printf("%f\n", sum);
    free(x);
    free(w);
    return 2.0 * 8 * 48 * K * calls / (t - t0) / 1e9;
}
/* Read bandwidth from memory: every thread sums its share of a 1 GiB buffer (far past the caches) with
 * 512-bit loads, best of several passes; GB/s of bytes read. */
static double read_rate(int threads, double seconds) {
    const long bytes = 1L << 30, n = bytes / 4;
    float *buf = aligned_alloc(1L << 21, bytes);
    madvise(buf, bytes, MADV_HUGEPAGE); /* as kvserve's KV cache: 4 KB pages would cost a TLB miss per page */
#pragma omp parallel for num_threads(threads)
    for (long i = 0; i < n; i++) buf[i] = 1e-9f;
    double best = 0, start = omp_get_wtime();
    float sink = 0;
    do {
        double t0 = omp_get_wtime();
        float part = 0;
#pragma omp parallel num_threads(threads) reduction(+ : part)
        {
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
#pragma omp for schedule(static)
            for (long i = 0; i < n; i += 64) {
                a0 = _mm512_add_ps(a0, _mm512_load_ps(buf + i));
                a1 = _mm512_add_ps(a1, _mm512_load_ps(buf + i + 16));
                a2 = _mm512_add_ps(a2, _mm512_load_ps(buf + i + 32));
                a3 = _mm512_add_ps(a3, _mm512_load_ps(buf + i + 48));
            }
            part += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        }
        sink += part;
        double rate = bytes / (omp_get_wtime() - t0) / 1e9;
        if (rate > best) best = rate;
    } while (omp_get_wtime() - start < seconds);
    if (sink == 12345.0f) printf("%f\n", sink);
    free(buf);
    return best;
}
int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    int n = omp_get_max_threads();
    double f1 = run(0, 1, seconds), fn = run(0, n, seconds), b1 = run(1, 1, seconds), bn = run(1, n, seconds);
    double r1 = read_rate(1, seconds), rn = read_rate(n, seconds);
    printf("float32 FMA: %.0f GFLOP/s on 1 thread, %.0f on %d\n", f1, fn, n);
    printf("bf16 VDPBF16PS: %.0f GFLOP/s on 1 thread, %.0f on %d\n", b1, bn, n);
    printf("read bandwidth (1 GiB, summed): %.1f GB/s on 1 thread, %.1f on %d\n", r1, rn, n);
    printf("bf16 linear micro-tile (8x48, weights in cache): %.0f GFLOP/s on 1 thread\n", tile_rate(seconds));
    if (argc > 2) {
        FILE *f = fopen(argv[2], "w");
        if (!f) return 1;
        fprintf(f, "{\"threads\": %d, \"fp32_gflops\": %.1f, \"bf16_gflops\": %.1f, \"read_gbs\": %.2f, "
                   "\"fp32_gflops_1t\": %.1f, \"bf16_gflops_1t\": %.1f, \"read_gbs_1t\": %.2f}\n",
                n, fn, bn, rn, f1, b1, r1);
        fclose(f);
    }
    return 0;
}
"""


def measure(seconds: float = 1.0, quiet: bool = False) -> dict[str, float]:
    """{threads, fp32_gflops, bf16_gflops, read_gbs, and the same on one thread (_1t)}, measured now."""
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe, out = Path(tmp) / "peak.c", Path(tmp) / "peak", Path(tmp) / "peak.json"
        src.write_text(SOURCE)
        subprocess.run(
            [cc, "-O3", "-march=native", "-ffp-contract=off", "-fopenmp", str(src), "-o", str(exe)], check=True
        )
        text = subprocess.run([str(exe), str(seconds), str(out)], check=True, capture_output=True, text=True).stdout
        if not quiet:
            print(text, end="")
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = ap.parse_args()
    measure(args.seconds)


if __name__ == "__main__":
    main()
