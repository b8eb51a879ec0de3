"""This CPU's peak multiply-add rate: float32 FMA and bf16 VDPBF16PS, one thread and all threads.

    .venv/bin/python bench/cpu_peak.py [--seconds 1.0]

Builds a tiny C loop (24 independent accumulators, no memory traffic) with the system compiler, as
kvserve/model/native.py builds the kernels, and runs it on 1 and on every OpenMP thread. The result bounds
what any kernel can reach here: the README uses it for the warm-TTFT and batch-32 decode arguments of issue 3
(attention and linears are multiply-add bound, so a ratio of FLOP counts over this rate is a floor on time).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
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
int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    int n = omp_get_max_threads();
    printf("float32 FMA: %.0f GFLOP/s on 1 thread, %.0f on %d\n", run(0, 1, seconds), run(0, n, seconds), n);
    printf("bf16 VDPBF16PS: %.0f GFLOP/s on 1 thread, %.0f on %d\n", run(1, 1, seconds), run(1, n, seconds), n);
    return 0;
}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = ap.parse_args()
    cc = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([cc, "-O2", "-march=native", "-fopenmp", str(src), "-o", str(exe)], check=True)
        print(subprocess.run([str(exe), str(args.seconds)], check=True, capture_output=True, text=True).stdout, end="")


if __name__ == "__main__":
    main()
