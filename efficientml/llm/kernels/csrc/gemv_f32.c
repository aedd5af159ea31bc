/* fp32 matrix-vector products for decoding on CPU: Y = X W^T (+ b) for a few input rows.
 *
 * W is (out, in) row-major (nn.Linear's own layout), X is (M, in) and Y is (M, out), both row-major,
 * M small (batch-1 decoding: 1; a batch of sequences, a few prompt tokens: up to 8). Each thread
 * takes a contiguous block of weight rows, so it streams one contiguous range of memory once, and
 * every weight vector loaded is used for all M input rows before it is dropped: the product costs
 * about one pass over W for any small M, where BLAS re-reads W (or runs a GEMM kernel built for
 * large M). R weight rows × MC input rows are computed together in R·MC vector accumulators (R·MC ≤
 * 8: R = 4 for M ≤ 2, R = 2 with chunks of up to 4 input rows otherwise; the chunks re-read R rows
 * from L1, not from memory). The software prefetch eight rows ahead keeps enough cache-line requests
 * in flight to reach the memory bandwidth with two threads (without it the loop is latency-bound at
 * ~60% of it).
 *
 * GCC/Clang vector extensions, not intrinsics: the same source becomes AVX2/AVX-512 or NEON code
 * under -march=native. OpenMP threads come from the process's runtime (the libgomp torch loaded).
 * Compiled at run time by efficientml/llm/cpu_gemv.py. */
#include <stdint.h>

typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

static inline v8f load8(const float *p) { return *(const v8f_unaligned *)p; }

static inline float hsum8(v8f v) {
    float s = 0.f;
    for (int k = 0; k < 8; k++) s += v[k];
    return s;
}

static inline float dot_tail(const float *w, const float *x, int64_t from, int64_t in) {
    float s = 0.f;
    for (int64_t i = from; i < in; i++) s += w[i] * x[i];
    return s;
}

#define PREFETCH_ROWS 8

/* Y[m, o + r] for r < R, m < MC: weight rows o … o+R-1 against input rows X[0 … MC-1]. R and MC are
 * compile-time constants at every call (the switch below), so the loops unroll and the accumulators
 * stay in registers. */
static inline __attribute__((always_inline))
void tile(const int R, const int MC, const float *W, const float *X, const float *b, float *Y,
          int64_t o, int64_t out, int64_t in, int prefetch) {
    const int64_t in8 = in - in % 8, ahead = PREFETCH_ROWS * in;
    const float *w = W + o * in;
    v8f acc[4][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MC; m++) acc[r][m] = (v8f){0};
    for (int64_t i = 0; i < in8; i += 8) {
        v8f wv[4];
        for (int r = 0; r < R; r++) {
            if (prefetch) __builtin_prefetch(w + r * in + i + ahead, 0, 3);
            wv[r] = load8(w + r * in + i);
        }
        for (int m = 0; m < MC; m++) {
            const v8f xv = load8(X + m * in + i);
            for (int r = 0; r < R; r++) acc[r][m] += wv[r] * xv;
        }
    }
    for (int m = 0; m < MC; m++)
        for (int r = 0; r < R; r++)
            Y[m * out + o + r] = hsum8(acc[r][m]) + dot_tail(w + r * in, X + m * in, in8, in)
                                 + (b ? b[o + r] : 0.f);
}

/* All M input rows against weight rows o … o+R-1 (R = 4 or 2), in chunks of at most 4 input rows;
 * only the first chunk prefetches (the others find the rows in cache). */
static void rows(const int R, const float *W, const float *X, const float *b, float *Y,
                 int64_t o, int64_t M, int64_t out, int64_t in) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mc = M - m0 < 4 ? M - m0 : 4;
        const float *x = X + m0 * in;
        float *y = Y + m0 * out;
        const int pf = m0 == 0;
        if (R == 4) {
            if (mc == 1) tile(4, 1, W, x, b, y, o, out, in, pf);
            else tile(4, 2, W, x, b, y, o, out, in, pf);  /* R = 4 only for M ≤ 2 */
        } else if (R == 2) {
            switch (mc) {
            case 1: tile(2, 1, W, x, b, y, o, out, in, pf); break;
            case 2: tile(2, 2, W, x, b, y, o, out, in, pf); break;
            case 3: tile(2, 3, W, x, b, y, o, out, in, pf); break;
            default: tile(2, 4, W, x, b, y, o, out, in, pf); break;
            }
        } else {
            switch (mc) {
            case 1: tile(1, 1, W, x, b, y, o, out, in, pf); break;
            case 2: tile(1, 2, W, x, b, y, o, out, in, pf); break;
            case 3: tile(1, 3, W, x, b, y, o, out, in, pf); break;
            default: tile(1, 4, W, x, b, y, o, out, in, pf); break;
            }
        }
    }
}

void efficientml_gemv_f32(const float *W, const float *X, const float *b, float *Y,
                          int64_t M, int64_t out, int64_t in, int nthreads) {
    const int R = M <= 2 ? 4 : 2;
    const int64_t blocks = (out + R - 1) / R;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t o = blk * R;
        if (o + R <= out) {
            rows(R, W, X, b, Y, o, M, out, in);
        } else {
            for (int64_t r = o; r < out; r++) rows(1, W, X, b, Y, r, M, out, in);
        }
    }
}
