/* fp32 matrix-vector product for batch-1 decoding on CPU: y = W x (+ b).
 *
 * W is (out, in) row-major (nn.Linear's own layout). Each thread takes a contiguous block of rows,
 * so it streams one contiguous range of memory; four rows share each load of x. The software
 * prefetch eight rows ahead keeps enough cache-line requests in flight to reach the memory
 * bandwidth with two threads (without it the loop is latency-bound at ~60% of it).
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

void efficientml_gemv_f32(const float *W, const float *x, const float *b, float *y,
                          int64_t out, int64_t in, int nthreads) {
    const int64_t in8 = in - in % 8;
    const int64_t blocks = (out + 3) / 4;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t o = blk * 4;
        if (o + 4 <= out) {
            const float *w0 = W + o * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
            const int64_t ahead = PREFETCH_ROWS * in;
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t i = 0; i < in8; i += 8) {
                __builtin_prefetch(w0 + i + ahead, 0, 3);
                __builtin_prefetch(w1 + i + ahead, 0, 3);
                __builtin_prefetch(w2 + i + ahead, 0, 3);
                __builtin_prefetch(w3 + i + ahead, 0, 3);
                const v8f xv = load8(x + i);
                a0 += load8(w0 + i) * xv;
                a1 += load8(w1 + i) * xv;
                a2 += load8(w2 + i) * xv;
                a3 += load8(w3 + i) * xv;
            }
            y[o] = hsum8(a0) + dot_tail(w0, x, in8, in) + (b ? b[o] : 0.f);
            y[o + 1] = hsum8(a1) + dot_tail(w1, x, in8, in) + (b ? b[o + 1] : 0.f);
            y[o + 2] = hsum8(a2) + dot_tail(w2, x, in8, in) + (b ? b[o + 2] : 0.f);
            y[o + 3] = hsum8(a3) + dot_tail(w3, x, in8, in) + (b ? b[o + 3] : 0.f);
        } else {
            for (int64_t r = o; r < out; r++) {
                const float *w = W + r * in;
                v8f a = {0};
                for (int64_t i = 0; i < in8; i += 8) a += load8(w + i) * load8(x + i);
                y[r] = hsum8(a) + dot_tail(w, x, in8, in) + (b ? b[r] : 0.f);
            }
        }
    }
}
