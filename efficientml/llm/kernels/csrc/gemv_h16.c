/* 16-bit-weight matrix-vector products for decoding on CPU: Y = X W^T (+ b), W (out, in) bf16 or fp16
 * (nn.Linear's layout), X (M, in) and Y (M, out) fp32, M small (1 to 8).
 *
 * The same loop as gemv_f32.c (R weight rows × MC input rows in vector accumulators, each thread a
 * contiguous block of rows, software prefetch eight rows ahead), reading half the bytes: each
 * 8-weight load (16 where the build has AVX-512) is widened to fp32 in registers — bf16 by a 16-bit shift (exact, any CPU), fp16 by
 * F16C's 8-lane vcvtph2ps where -march=native has it, else the compiler's _Float16 conversion — and the products
 * are summed in fp32. Compiled at run time by efficientml/llm/kernels/cpu_gemv16.py. */
#include <stdint.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* VW lanes per vector: 16 where the build has AVX-512 (-march=native on such a CPU), else 8. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define VW 16
#else
#define VW 8
#endif
typedef float v8f __attribute__((vector_size(VW * 4)));
typedef float v8f_unaligned __attribute__((vector_size(VW * 4), aligned(4), may_alias));
typedef uint16_t v8u16 __attribute__((vector_size(VW * 2), aligned(2), may_alias));
typedef uint32_t v8u32 __attribute__((vector_size(VW * 4)));

static inline v8f load8(const float *p) { return *(const v8f_unaligned *)p; }

/* VW bf16 → VW fp32: the bf16 bits are the fp32's upper half */
static inline v8f widen8_bf16(const uint16_t *p) {
    const v8u32 u = __builtin_convertvector(*(const v8u16 *)p, v8u32) << 16;
    return (v8f)u;
}

#ifdef __FLT16_MAX__
#if defined(__F16C__) || (VW == 16)  /* one vcvtph2ps on all lanes (GCC's vector conversion does them one by one) */
static inline v8f widen8_f16(const uint16_t *p) {
#if VW == 16
    return (v8f)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
    return (v8f)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#endif
}
#else
typedef _Float16 v8h __attribute__((vector_size(VW * 2), aligned(2), may_alias));
static inline v8f widen8_f16(const uint16_t *p) { return __builtin_convertvector(*(const v8h *)p, v8f); }
#endif
static inline float widen1_f16(uint16_t h) { _Float16 f; __builtin_memcpy(&f, &h, 2); return (float)f; }
#define HAVE_F16 1
#else
static inline v8f widen8_f16(const uint16_t *p) { (void)p; return (v8f){0}; }
static inline float widen1_f16(uint16_t h) { (void)h; return 0.f; }
#define HAVE_F16 0
#endif

static inline float widen1_bf16(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; __builtin_memcpy(&f, &u, 4); return f; }

static inline float hsum8(v8f v) {
    float s = 0.f;
    for (int k = 0; k < VW; k++) s += v[k];
    return s;
}

/* a·b + c in one rounding where the CPU has FMA, in every tile: a row's result must not depend on how many
 * rows share the call (a speculative verify of k + 1 rows has to give the tokens a one-row decode gives). */
#if VW == 16
static inline v8f vfma(v8f a, v8f b, v8f c) { return (v8f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#define WIDE_R 4  /* 32 registers: 4 weight rows × 4 input rows of accumulators */
#elif defined(__FMA__)
static inline v8f vfma(v8f a, v8f b, v8f c) { return (v8f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#define WIDE_R 2
#else
static inline v8f vfma(v8f a, v8f b, v8f c) { return a * b + c; }
#define WIDE_R 2
#endif

static inline float dot_tail(const uint16_t *w, const float *x, int64_t from, int64_t in, int f16) {
    float s = 0.f;
    for (int64_t i = from; i < in; i++) s += (f16 ? widen1_f16(w[i]) : widen1_bf16(w[i])) * x[i];
    return s;
}

#define PREFETCH_ROWS 8

/* Y[m, o + r] for r < R, m < MC: weight rows o … o+R-1 against input rows X[0 … MC-1]. R and MC are
 * compile-time constants at every call (the switch below), so the loops unroll and the accumulators
 * stay in registers. */
static inline __attribute__((always_inline))
void tile(const int R, const int MC, const int F16, const uint16_t *W, const float *X, const float *b, float *Y,
          int64_t o, int64_t out, int64_t in, int prefetch) {
    const int64_t in8 = in - in % VW, ahead = PREFETCH_ROWS * in;
    const uint16_t *w = W + o * in;
    v8f acc[4][4];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MC; m++) acc[r][m] = (v8f){0};
    for (int64_t i = 0; i < in8; i += VW) {
        v8f wv[4];
        for (int r = 0; r < R; r++) {
            if (prefetch) __builtin_prefetch(w + r * in + i + ahead, 0, 3);
            wv[r] = F16 ? widen8_f16(w + r * in + i) : widen8_bf16(w + r * in + i);
        }
        for (int m = 0; m < MC; m++) {
            const v8f xv = load8(X + m * in + i);
            for (int r = 0; r < R; r++) acc[r][m] = vfma(wv[r], xv, acc[r][m]);
        }
    }
    for (int m = 0; m < MC; m++)
        for (int r = 0; r < R; r++)
            Y[m * out + o + r] = hsum8(acc[r][m]) + dot_tail(w + r * in, X + m * in, in8, in, F16)
                                 + (b ? b[o + r] : 0.f);
}

/* All M input rows against weight rows o … o+R-1 (R = 4 or 2), in chunks of at most 4 input rows;
 * only the first chunk prefetches (the others find the rows in cache). */
static inline __attribute__((always_inline))
void rows(const int R, const int F16, const uint16_t *W, const float *X, const float *b, float *Y,
                 int64_t o, int64_t M, int64_t out, int64_t in) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mc = M - m0 < 4 ? M - m0 : 4;
        const float *x = X + m0 * in;
        float *y = Y + m0 * out;
        const int pf = m0 == 0;
        if (R == 4) {  /* M ≤ 2, or any M on AVX-512 (WIDE_R) */
            switch (mc) {
            case 1: tile(4, 1, F16, W, x, b, y, o, out, in, pf); break;
            case 2: tile(4, 2, F16, W, x, b, y, o, out, in, pf); break;
            case 3: tile(4, 3, F16, W, x, b, y, o, out, in, pf); break;
            default: tile(4, 4, F16, W, x, b, y, o, out, in, pf); break;
            }
        } else if (R == 2) {
            switch (mc) {
            case 1: tile(2, 1, F16, W, x, b, y, o, out, in, pf); break;
            case 2: tile(2, 2, F16, W, x, b, y, o, out, in, pf); break;
            case 3: tile(2, 3, F16, W, x, b, y, o, out, in, pf); break;
            default: tile(2, 4, F16, W, x, b, y, o, out, in, pf); break;
            }
        } else {
            switch (mc) {
            case 1: tile(1, 1, F16, W, x, b, y, o, out, in, pf); break;
            case 2: tile(1, 2, F16, W, x, b, y, o, out, in, pf); break;
            case 3: tile(1, 3, F16, W, x, b, y, o, out, in, pf); break;
            default: tile(1, 4, F16, W, x, b, y, o, out, in, pf); break;
            }
        }
    }
}

static inline __attribute__((always_inline)) void gemv16(const int F16, const uint16_t *W, const float *X, const float *b, float *Y,
                   int64_t M, int64_t out, int64_t in, int nthreads) {
    const int R = M <= 2 ? 4 : WIDE_R;
    const int64_t blocks = (out + R - 1) / R;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t o = blk * R;
        if (o + R <= out) {
            rows(R, F16, W, X, b, Y, o, M, out, in);
        } else {
            for (int64_t r = o; r < out; r++) rows(1, F16, W, X, b, Y, r, M, out, in);
        }
    }
}

/* W: bf16 (f16 = 0) or fp16 (f16 = 1) bits. Returns −1 for fp16 where the compiler has no _Float16. */
int efficientml_gemv_h16(const uint16_t *W, const float *X, const float *b, float *Y,
                         int64_t M, int64_t out, int64_t in, int nthreads, int f16) {
    if (f16 && !HAVE_F16) return -1;
    if (f16) gemv16(1, W, X, b, Y, M, out, in, nthreads);
    else gemv16(0, W, X, b, Y, M, out, in, nthreads);
    return 0;
}

int efficientml_gemv_h16_has_f16(void) { return HAVE_F16; }
