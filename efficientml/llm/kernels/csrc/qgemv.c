/* Quantized matrix products for decoding on CPU: Y = X W^T (+ b) with 4- or 8-bit weights and
 * int8 activations, so the inner product is an integer dot product (Lec11's W4A8/W8A8 on CPU).
 *
 * Weights come in blocks of 32 along the input dimension, every block with a float scale d and an
 * optional float offset m: w = d·q + m. 4 bits: 16 bytes per block, byte j holding q[j] in its low
 * nibble and q[j + 16] in its high nibble (GGUF's Q4_0/Q4_1 order), q unsigned 0…15. 8 bits: 32
 * int8 codes. Without m, 4-bit codes are centred on 8 (Q4_0: w = d·(q − 8), no offset array read)
 * and 8-bit ones on 0 (Q8_0: w = d·q); Q4_1 is d·q + m; a compressed-tensors group of g = 32k
 * weights is k blocks that share one scale, m = −z·d (or none when z is the centre).
 *
 * X (M, K) is quantized per block of 32 to int8 a with scale e = max|x| / 127 and the block sum Σa, so
 *   Σ_k w_k x_k ≈ Σ_blocks e·(d·Σ q·a + m·Σ a).
 * The AVX2 path does Σ q·a with _mm256_maddubs_epi16 (u8 × s8 pairs → s16; for signed 8-bit codes
 * |q| × sign(a, q)) and _mm256_madd_epi16 (→ s32), then one float FMA per block into a vector
 * accumulator; the portable path is plain C with the same integers (the results agree to float
 * rounding of the per-block sums). Both are in this one file, the AVX2 one compiled for that target
 * by attribute, and chosen per call by the caller (isa = 0 portable, 1 AVX2, 2 AVX-512 VNNI, which is
 * qgemv_avx512.h; see cpu_qgemv.py).
 *
 * Threads (OpenMP) each take a contiguous block of weight rows, so each streams one contiguous range
 * of memory once; a row (K/2 or K bytes: in L1) is used for every input row before the next one is
 * read, so M rows cost one pass over W (decode M = 1, a small batch, or a whole prompt). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86 1
#endif

#define QK 32
#define MC_MAX 8

/* x (M, K) → a (M, K) int8, e (M, K/32) scales, sa (M, K/32) block sums of a. Round half to even
 * (lrintf in the default rounding mode), as torch.round does. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *a, float *e, int32_t *sa) {
    const int64_t nb = K / QK;
    for (int64_t r = 0; r < M * nb; r++) {
        const float *xb = x + r * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        int32_t s = 0;
        for (int j = 0; j < QK; j++) {
            long q = lrintf(xb[j] * id);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            a[r * QK + j] = (int8_t)q;
            s += (int32_t)q;
        }
        e[r] = d;
        sa[r] = s;
    }
}

#ifdef HAVE_X86
/* quantize_rows with AVX2: the same float operations (|x| max, x · (127 / max), round half to even,
 * clamp; NaN → −127 as lrintf's LONG_MIN clamps), so the same codes, scales and sums bit for bit. */
__attribute__((target("avx2,fma")))
static void quantize_rows_avx2(const float *x, int64_t M, int64_t K, int8_t *a, float *e, int32_t *sa) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t r = 0; r < M * (K / QK); r++) {
        const float *xb = x + r * QK;
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(xb + 8 * k);
            mx = _mm256_max_ps(_mm256_and_ps(v[k], absmask), mx);  /* NaN lanes: mx kept, as fmaxf */
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        const __m256 idv = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; k++) {
            __m256 t = _mm256_round_ps(_mm256_mul_ps(v[k], idv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            t = _mm256_min_ps(_mm256_max_ps(t, lo), hi);  /* max(NaN, lo) = lo */
            q[k] = _mm256_cvtps_epi32(t);
        }
        const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(a + r * QK), _mm256_permutevar8x32_epi32(p, order));
        const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(1, 0, 3, 2)));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, _MM_SHUFFLE(2, 3, 0, 1)));
        e[r] = d;
        sa[r] = _mm_cvtsi128_si32(s4);
    }
}
#endif

/* ---- portable C ---------------------------------------------------------------------------- */

static inline int32_t dot_block_portable(const uint8_t *q, const int8_t *a, int bits) {
    int32_t s = 0;
    if (bits == 4) {
        for (int j = 0; j < 16; j++)
            s += (int32_t)(q[j] & 0x0F) * a[j] + (int32_t)(q[j] >> 4) * a[j + 16];
    } else {
        const int8_t *w = (const int8_t *)q;
        for (int j = 0; j < QK; j++) s += (int32_t)w[j] * a[j];
    }
    return s;
}

static void row_portable(const uint8_t *qs, const float *d, const float *m, int bits, const int8_t *a,
                         const float *e, const int32_t *sa, int64_t M, int64_t K, float *out) {
    const int64_t nb = K / QK, bb = bits == 4 ? QK / 2 : QK;
    for (int64_t r = 0; r < M; r++) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; b++) {
            const int32_t s = dot_block_portable(qs + b * bb, a + r * K + b * QK, bits);
            float t = d[b] * (float)s;
            if (m) t += m[b] * (float)sa[r * nb + b];
            else if (bits == 4) t -= 8.f * d[b] * (float)sa[r * nb + b];
            acc += e[r * nb + b] * t;
        }
        out[r] = acc;
    }
}

/* ---- AVX2 ---------------------------------------------------------------------------------- */
#ifdef HAVE_X86
#define AVX2 __attribute__((target("avx2,fma"))) static inline

AVX2 __m256i unpack4(const uint8_t *q) {  /* 16 bytes → 32 codes 0…15 in block order */
    const __m128i raw = _mm_loadu_si128((const __m128i *)q);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

AVX2 float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Σ q·a over one block as 8 int32 lanes: 4-bit codes are unsigned (maddubs as is); 8-bit codes are
 * signed, so |q| × sign(a, q) (|−128| = 128 still fits maddubs' unsigned operand). */
AVX2 __m256i dot_block_avx2(__m256i q, __m256i av, int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p;
    if (bits == 4) p = _mm256_maddubs_epi16(q, av);
    else p = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(av, q));
    return _mm256_madd_epi16(p, ones);
}

/* Σ_b m_b·e_b·Σa_b for one weight row and one input row (es = e·Σa, precomputed per input block). */
AVX2 float offset_avx2(const float *m, const float *es, int64_t nb) {
    __m256 acc = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= nb; b += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(es + b), acc);
    float s = hsum256(acc);
    for (; b < nb; b++) s += m[b] * es[b];
    return s;
}

/* Weight rows o … o+R−1 against input rows 0 … MC−1 (R, MC compile-time constants at every call, so
 * the R·MC accumulators stay in registers): each code block is unpacked once for MC input rows, each
 * activation block loaded once for R weight rows. */
AVX2 __attribute__((always_inline))
void tile_avx2(const int R, const int MC, const int bits, const uint8_t *qs, const float *d, const float *m,
               const int8_t *a, const float *e, const float *es, int64_t K, int64_t row_bytes,
               int64_t ahead, float *out, int64_t ldo) {
    const int64_t nb = K / QK, bb = bits == 4 ? QK / 2 : QK;
    __m256 acc[4][MC_MAX];
    for (int i = 0; i < R; i++)
        for (int r = 0; r < MC; r++) acc[i][r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m256i q[4];
        __m256 dv[4];
        for (int i = 0; i < R; i++) {
            const uint8_t *qb = qs + i * row_bytes + b * bb;
            if (ahead) __builtin_prefetch(qb + ahead, 0, 3);
            q[i] = bits == 4 ? unpack4(qb) : _mm256_loadu_si256((const __m256i *)qb);
            dv[i] = _mm256_set1_ps(d[i * nb + b]);
        }
        for (int r = 0; r < MC; r++) {
            const __m256i av = _mm256_loadu_si256((const __m256i *)(a + r * K + b * QK));
            const __m256 ev = _mm256_set1_ps(e[r * nb + b]);
            for (int i = 0; i < R; i++) {
                const __m256 s = _mm256_cvtepi32_ps(dot_block_avx2(q[i], av, bits));
                acc[i][r] = _mm256_fmadd_ps(_mm256_mul_ps(dv[i], ev), s, acc[i][r]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int r = 0; r < MC; r++)
            out[i * ldo + r] = hsum256(acc[i][r]) + (m ? offset_avx2(m + i * nb, es + r * nb, nb)
                                                     : bits == 4 ? -8.f * offset_avx2(d + i * nb, es + r * nb, nb) : 0.f);
}

/* R weight rows (R = 4 for one input row, 2 for two, else 1) against all M input rows; R and bits are
 * compile-time constants at every call (rows_avx2 below), so the tiles have no branch inside. */
AVX2 __attribute__((always_inline))
void rows_avx2_(const int R, const int bits, const uint8_t *qs, const float *d, const float *m,
                const int8_t *a, const float *e, const float *es, int64_t M, int64_t K,
                int64_t ahead, float *out) {
    const int64_t nb = K / QK, row_bytes = bits == 4 ? K / 2 : K;
#define TILE(R_, MC_) tile_avx2(R_, MC_, bits, qs, d, m, a + r0 * K, e + r0 * nb, es + r0 * nb, K, \
                                row_bytes, pf, out + r0, M)
    for (int64_t r0 = 0; r0 < M; r0 += MC_MAX) {
        const int64_t mc = M - r0 < MC_MAX ? M - r0 : MC_MAX;
        const int64_t pf = r0 == 0 ? ahead : 0;  /* later chunks find the rows in L1 */
        if (R == 4) { TILE(4, 1); continue; }
        if (R == 2) { TILE(2, 2); continue; }
        switch (mc) {
        case 1: TILE(1, 1); break;
        case 2: TILE(1, 2); break;
        case 3: TILE(1, 3); break;
        case 4: TILE(1, 4); break;
        case 5: TILE(1, 5); break;
        case 6: TILE(1, 6); break;
        case 7: TILE(1, 7); break;
        default: TILE(1, 8); break;
        }
    }
#undef TILE
}

__attribute__((target("avx2,fma")))
static void rows_avx2(const int R, const uint8_t *qs, const float *d, const float *m, int bits,
                      const int8_t *a, const float *e, const float *es, int64_t M, int64_t K,
                      int64_t ahead, float *out) {
#define ROWS(R_, B_) rows_avx2_(R_, B_, qs, d, m, a, e, es, M, K, ahead, out)
    if (bits == 4) {
        if (R == 4) ROWS(4, 4); else if (R == 2) ROWS(2, 4); else ROWS(1, 4);
    } else {
        if (R == 4) ROWS(4, 8); else if (R == 2) ROWS(2, 8); else ROWS(1, 8);
    }
#undef ROWS
}

#include "qgemv_avx512.h"

/* R weight rows on the AVX-512 VNNI tiles (wide: a in pair order, ep the spread scales) or the AVX2 ones. */
static void rows_simd(int wide, const int R, const uint8_t *qs, const float *d, const float *m, int bits,
                      const int8_t *a, const float *e, const float *ep, const float *es, int64_t M, int64_t K,
                      int64_t ahead, float *out) {
    if (wide) rows512(R, qs, d, m, bits, a, ep, es, M, K, ahead, out);
    else rows_avx2(R, qs, d, m, bits, a, e, es, M, K, ahead, out);
}
#endif

int efficientml_qgemv_has_avx512vnni(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

int efficientml_qgemv_has_avx2(void) {
#ifdef HAVE_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Y (M, out) = X (M, K) · W^T (+ bias). qs: (out, K/2) or (out, K) bytes; d, m: (out, K/32) floats (m may be
 * NULL); K a multiple of 32. Returns 0, or −1 when the workspace could not be allocated. */
int efficientml_qgemv(const uint8_t *qs, const float *d, const float *m, int bits, const float *x,
                      const float *bias, float *y, int64_t M, int64_t out, int64_t K, int nthreads, int isa) {
    const int64_t nb = K / QK, row_bytes = bits == 4 ? K / 2 : K;
    int8_t *a = malloc((size_t)(M * K));
    float *e = malloc(sizeof(float) * (size_t)(M * nb));
    float *es = malloc(sizeof(float) * (size_t)(M * nb));
    int32_t *sa = malloc(sizeof(int32_t) * (size_t)(M * nb));
    float *tmp = malloc(sizeof(float) * (size_t)(M * out));
    const int wide = isa == 2 && nb % 2 == 0;  /* AVX-512 VNNI: pairs of blocks */
    int8_t *ap = wide && bits == 4 ? malloc((size_t)(M * K)) : NULL;
    float *ep = wide ? malloc(sizeof(float) * (size_t)(M * nb * 8)) : NULL;
    if (!a || !e || !es || !sa || !tmp || (wide && (!ep || (bits == 4 && !ap)))) {
        free(a); free(e); free(es); free(sa); free(tmp); free(ap); free(ep);
        return -1;
    }
#ifdef HAVE_X86
    if (isa >= 1) quantize_rows_avx2(x, M, K, a, e, sa);
    else
#endif
    quantize_rows(x, M, K, a, e, sa);
    for (int64_t i = 0; i < M * nb; i++) es[i] = e[i] * (float)sa[i];
#ifdef HAVE_X86
    if (wide) {
        spread_scales(e, M, nb, bits, ep);
        if (bits == 4) permute_pairs(a, M, K, ap);
    }
#endif
    const int8_t *aw = ap ? ap : a;
    const int R = isa >= 1 ? (M == 1 ? 4 : (M == 2 ? 2 : 1)) : 1;
    /* prefetch 4 tiles ahead into L1 (prefetcht0: prefetchnta halved the speed on a Xeon); rows in chunks
     * of 16 tiles taken dynamically, so a thread that starts late or runs slower takes fewer */
    const int64_t blocks = (out + R - 1) / R, ahead = 4 * R * row_bytes;
    #pragma omp parallel for schedule(dynamic, 16) num_threads(nthreads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t o = blk * R;
        float *t = tmp + o * M;  /* (out, M): each thread writes its own contiguous range */
#ifdef HAVE_X86
        if (isa >= 1) {
            const int64_t pf = o + 5 * R <= out ? ahead : 0;
            if (o + R <= out) rows_simd(wide, R, qs + o * row_bytes, d + o * nb, m ? m + o * nb : NULL, bits, aw, e,
                                        ep, es, M, K, pf, t);
            else for (int64_t r = o; r < out; r++)
                rows_simd(wide, 1, qs + r * row_bytes, d + r * nb, m ? m + r * nb : NULL, bits, aw, e, ep, es, M, K,
                          0, tmp + r * M);
            continue;
        }
#endif
        row_portable(qs + o * row_bytes, d + o * nb, m ? m + o * nb : NULL, bits, a, e, sa, M, K, t);
    }
    for (int64_t r = 0; r < M; r++)
        for (int64_t o = 0; o < out; o++) y[r * out + o] = tmp[o * M + r] + (bias ? bias[o] : 0.f);
    free(a); free(e); free(es); free(sa); free(tmp); free(ap); free(ep);
    return 0;
}
