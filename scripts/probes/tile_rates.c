// The core's AVX-512 multiply-add rate in two settings, outside the engine (plain C, gcc):
//   1. register-only: 12 independent FMA chains for 400 slices of about 0.4 ms each (does the
//      rate drop under sustained AVX-512?);
//   2. a 12x32 GEMM tile as the engine's f32 kernel runs it (per k step 2 weight vectors loaded,
//      12 broadcasts, 24 FMAs; activations interleaved), its weights a stream of 8 KB (L1) to
//      4 MB, three rounds in turn (how much does feeding the weights from L2 cost?).
// Build and run: scripts/tile_rates.sh
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static double tile(int k, int reps) {
    float *b = aligned_alloc(64, (size_t)k * 32 * 4), *a = aligned_alloc(64, (size_t)k * 12 * 4);
    for (int i = 0; i < k * 32; i++) b[i] = 1e-6f * (i % 7);
    for (int i = 0; i < k * 12; i++) a[i] = 1e-3f * (i % 5);
    __m512 c[12][2];
    for (int i = 0; i < 12; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
    double t0 = now();
    for (int r = 0; r < reps; r++) {
        const float *w = b, *x = a;
        for (int kk = 0; kk < k; kk++, w += 32, x += 12) {
            __m512 w0 = _mm512_load_ps(w), w1 = _mm512_load_ps(w + 16);
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) {
                __m512 v = _mm512_set1_ps(x[i]);
                c[i][0] = _mm512_fmadd_ps(v, w0, c[i][0]);
                c[i][1] = _mm512_fmadd_ps(v, w1, c[i][1]);
            }
        }
    }
    double t = now() - t0;
    float s = 0;
    for (int i = 0; i < 12; i++) s += _mm512_reduce_add_ps(c[i][0]) + _mm512_reduce_add_ps(c[i][1]);
    if (s == 12345.0f) printf(" ");
    free(a);
    free(b);
    return (double)reps * k * 384 / t / 1e9;
}

int main(void) {
    __m512 acc[12];
    for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_ps(1.0f + i * 1e-3f);
    __m512 x = _mm512_set1_ps(0.999999f), y = _mm512_set1_ps(1e-7f);
    double rate[400];
    for (int s = 0; s < 400; s++) {
        double t0 = now();
        for (int kk = 0; kk < 200000; kk++) {
#pragma GCC unroll 12
            for (int i = 0; i < 12; i++) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
        }
        rate[s] = 200000.0 * 12 * 16 / (now() - t0) / 1e9;
    }
    float sink = 0;
    for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_ps(acc[i]);
    printf("register-only FMA, GMAC/s per slice (every 20th):");
    for (int s = 0; s < 400; s += 20) printf(" %.1f", rate[s]);
    printf("%s\n", sink == 12345.0f ? " " : "");
    int ks[] = {64, 256, 2048, 8192, 32768};
    for (int round = 0; round < 3; round++) {
        printf("12x32 tile, GMAC/s by weight stream:");
        for (int j = 0; j < 5; j++) {
            int k = ks[j];
            printf("  %d KB %.1f", k * 128 / 1024, tile(k, (int)(4e8 / (k * 384.0)) + 1));
        }
        printf("\n");
    }
    return 0;
}
