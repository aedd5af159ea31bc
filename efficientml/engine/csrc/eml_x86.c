/* x86 micro-kernels of the host build (EML_HOST): AVX2 and AVX-512 VNNI, each a function with a GCC
 * target attribute, so one shared library runs anywhere and eml_host.c picks a path from the CPU's
 * flags at run time. Nothing here is compiled for a microcontroller or a non-x86 host.
 *
 * GEMM tiles compute acc[8][32] (row r, column n, int32) = sum over k of w_r[k] * b[k][n] where b is
 * packed: for each group of 4 (uint8) or 2 (int16) consecutive k, the tile's 32 columns side by side,
 * each column's 4 (or 2) values adjacent (so one 32-bit lane holds one column's group).
 * - uint8 x int8, VNNI: vpdpbusd sums the 4 products of a lane into int32, no intermediate saturation.
 * - uint8 x int8, AVX2: vpmaddubsw sums pairs in *saturating* int16, exact only when every pair sum
 *   fits: 2 * 255 * |w| <= 32767, i.e. |w| <= 64 (the default reduce_range weights, |w| <= 63);
 *   the caller uses it only for such layers (`safe`), the portable tile otherwise.
 * - int16 x int16 (Winograd): vpmaddwd / vpdpwssd, products and pair sums exact in int32; int32 sums
 *   wrap modulo 2^32, which is exact for the final result (see eml_winograd.c).
 */
#if defined(EML_HOST) && defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define EML_X86 1

static int32_t eml_ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* rows: 8 weight-row pointers (rows past the layer's end repeat a valid one); kq: k groups */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void eml_tile_u8_vnni(const int8_t *const *wr, int32_t kq, const uint8_t *b, int32_t pp, int32_t *acc) {
    __m512i c[8][2];
    for (int r = 0; r < 8; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
    for (int32_t q = 0; q < kq; q++) {
        const uint8_t *bq = b + (int64_t)q * pp * 4;
        __m512i b0 = _mm512_loadu_si512((const void *)bq), b1 = _mm512_loadu_si512((const void *)(bq + 64));
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            __m512i wv = _mm512_set1_epi32(eml_ld32(wr[r] + 4 * q));
            c[r][0] = _mm512_dpbusd_epi32(c[r][0], b0, wv);
            c[r][1] = _mm512_dpbusd_epi32(c[r][1], b1, wv);
        }
    }
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_si512((void *)(acc + 32 * r), c[r][0]);
        _mm512_storeu_si512((void *)(acc + 32 * r + 16), c[r][1]);
    }
}

/* 4 rows x 16 columns of the tile per pass; pairs saturate in int16, so |w| <= 64 only (see above) */
__attribute__((target("avx2")))
static void eml_tile_u8_avx2(const int8_t *const *wr, int32_t kq, const uint8_t *b, int32_t pp, int32_t *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r0 = 0; r0 < 8; r0 += 4) {
        for (int n0 = 0; n0 < 32; n0 += 16) {
            __m256i c[4][2];
            for (int r = 0; r < 4; r++) c[r][0] = c[r][1] = _mm256_setzero_si256();
            for (int32_t q = 0; q < kq; q++) {
                const uint8_t *bq = b + (int64_t)q * pp * 4 + n0 * 4;
                __m256i b0 = _mm256_loadu_si256((const __m256i *)bq);
                __m256i b1 = _mm256_loadu_si256((const __m256i *)(bq + 32));
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    __m256i wv = _mm256_set1_epi32(eml_ld32(wr[r0 + r] + 4 * q));
                    c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(b0, wv), ones));
                    c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(b1, wv), ones));
                }
            }
            for (int r = 0; r < 4; r++) {
                _mm256_storeu_si256((__m256i *)(acc + 32 * (r0 + r) + n0), c[r][0]);
                _mm256_storeu_si256((__m256i *)(acc + 32 * (r0 + r) + n0 + 8), c[r][1]);
            }
        }
    }
}

/* int16 tiles for Winograd: rows of int16 weights (k pairs), b: kq pairs of 32 columns x 2 int16 */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void eml_tile_s16_vnni(const int16_t *const *wr, int32_t kq, const int16_t *b, int32_t pp, int32_t *acc) {
    __m512i c[8][2];
    for (int r = 0; r < 8; r++) c[r][0] = c[r][1] = _mm512_setzero_si512();
    for (int32_t q = 0; q < kq; q++) {
        const int16_t *bq = b + (int64_t)q * pp * 2;
        __m512i b0 = _mm512_loadu_si512((const void *)bq), b1 = _mm512_loadu_si512((const void *)(bq + 32));
#pragma GCC unroll 8
        for (int r = 0; r < 8; r++) {
            __m512i wv = _mm512_set1_epi32(eml_ld32(wr[r] + 2 * q));
            c[r][0] = _mm512_dpwssd_epi32(c[r][0], b0, wv);
            c[r][1] = _mm512_dpwssd_epi32(c[r][1], b1, wv);
        }
    }
    for (int r = 0; r < 8; r++) {
        _mm512_storeu_si512((void *)(acc + 32 * r), c[r][0]);
        _mm512_storeu_si512((void *)(acc + 32 * r + 16), c[r][1]);
    }
}

__attribute__((target("avx2")))
static void eml_tile_s16_avx2(const int16_t *const *wr, int32_t kq, const int16_t *b, int32_t pp, int32_t *acc) {
    for (int r0 = 0; r0 < 8; r0 += 4) {
        for (int n0 = 0; n0 < 32; n0 += 16) {
            __m256i c[4][2];
            for (int r = 0; r < 4; r++) c[r][0] = c[r][1] = _mm256_setzero_si256();
            for (int32_t q = 0; q < kq; q++) {
                const int16_t *bq = b + (int64_t)q * pp * 2 + n0 * 2;
                __m256i b0 = _mm256_loadu_si256((const __m256i *)bq);
                __m256i b1 = _mm256_loadu_si256((const __m256i *)(bq + 16));
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    __m256i wv = _mm256_set1_epi32(eml_ld32(wr[r0 + r] + 2 * q));
                    c[r][0] = _mm256_add_epi32(c[r][0], _mm256_madd_epi16(b0, wv));
                    c[r][1] = _mm256_add_epi32(c[r][1], _mm256_madd_epi16(b1, wv));
                }
            }
            for (int r = 0; r < 4; r++) {
                _mm256_storeu_si256((__m256i *)(acc + 32 * (r0 + r) + n0), c[r][0]);
                _mm256_storeu_si256((__m256i *)(acc + 32 * (r0 + r) + n0 + 8), c[r][1]);
            }
        }
    }
}

/* sum of x[i] * w[i] (uint8 x int8), exact in int32 */
__attribute__((target("avx512f,avx512bw,avx512vnni")))
static int32_t eml_dot_u8_vnni(const uint8_t *x, const int8_t *w, int32_t n) {
    __m512i c = _mm512_setzero_si512();
    int32_t i = 0;
    for (; i + 64 <= n; i += 64)
        c = _mm512_dpbusd_epi32(c, _mm512_loadu_si512((const void *)(x + i)),
                                _mm512_loadu_si512((const void *)(w + i)));
    int32_t s = _mm512_reduce_add_epi32(c);
    for (; i < n; i++) s += (int32_t)x[i] * w[i];
    return s;
}

/* AVX2: both operands widened to int16 first (no saturating pairs), products paired by vpmaddwd */
__attribute__((target("avx2")))
static int32_t eml_dot_u8_avx2(const uint8_t *x, const int8_t *w, int32_t n) {
    __m256i c = _mm256_setzero_si256();
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i xv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(x + i)));
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + i)));
        c = _mm256_add_epi32(c, _mm256_madd_epi16(xv, wv));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
    int32_t s = _mm_cvtsi128_si32(h);
    for (; i < n; i++) s += (int32_t)x[i] * w[i];
    return s;
}
/* Requantization of int32 accumulators, exactly eml_rq_body's shift-in-[1, 62] formula
 * clamp(((acc * m0 + add) mod 2^64) >> shift + zout, lo, hi) in 64-bit lanes: signed 32x32 -> 64
 * products of the even and odd lanes, wrapping 64-bit adds, an arithmetic shift (AVX2 has none for
 * 64 bits: the logical shift of x ^ sign, ^ sign again, is the same) and 64-bit clamps. Returns the
 * count done (a multiple of 16); the caller finishes the rest with the scalar formula. */
__attribute__((target("avx2")))
static __m256i eml_rq8_avx2(__m256i a, __m256i m, __m256i add, __m128i sh, __m256i z, __m256i lo, __m256i hi) {
    __m256i r[2];
    for (int j = 0; j < 2; j++) {
        __m256i p = _mm256_add_epi64(_mm256_mul_epi32(j ? _mm256_srli_epi64(a, 32) : a, m), add);
        __m256i sg = _mm256_cmpgt_epi64(_mm256_setzero_si256(), p);
        __m256i v = _mm256_add_epi64(_mm256_xor_si256(_mm256_srl_epi64(_mm256_xor_si256(p, sg), sh), sg), z);
        v = _mm256_blendv_epi8(v, lo, _mm256_cmpgt_epi64(lo, v));
        r[j] = _mm256_blendv_epi8(v, hi, _mm256_cmpgt_epi64(v, hi));
    }
    return _mm256_or_si256(r[0], _mm256_slli_epi64(r[1], 32));
}

__attribute__((target("avx2")))
static int32_t eml_rq_vec_avx2(const int32_t *acc, int32_t n, uint64_t add, int32_t m0, int32_t shift,
                               int32_t zout, int32_t lo, int32_t hi, uint8_t *y) {
    __m256i m = _mm256_set1_epi64x(m0), av = _mm256_set1_epi64x((int64_t)add), z = _mm256_set1_epi64x(zout);
    __m256i l = _mm256_set1_epi64x(lo), h = _mm256_set1_epi64x(hi);
    __m128i sh = _mm_cvtsi32_si128(shift);
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i r0 = eml_rq8_avx2(_mm256_loadu_si256((const __m256i *)(acc + i)), m, av, sh, z, l, h);
        __m256i r1 = eml_rq8_avx2(_mm256_loadu_si256((const __m256i *)(acc + i + 8)), m, av, sh, z, l, h);
        __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(r0, r1), 0xD8);   /* 16 int16 in order */
        _mm_storeu_si128((__m128i *)(y + i), _mm_packus_epi16(_mm256_castsi256_si128(w),
                                                              _mm256_extracti128_si256(w, 1)));
    }
    return i;
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
static int32_t eml_rq_vec_avx512(const int32_t *acc, int32_t n, uint64_t add, int32_t m0, int32_t shift,
                                 int32_t zout, int32_t lo, int32_t hi, uint8_t *y) {
    __m512i m = _mm512_set1_epi64(m0), av = _mm512_set1_epi64((int64_t)add), z = _mm512_set1_epi64(zout);
    __m512i l = _mm512_set1_epi64(lo), h = _mm512_set1_epi64(hi);
    __m128i sh = _mm_cvtsi32_si128(shift);
    int32_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512i a = _mm512_loadu_si512((const void *)(acc + i)), r[2];
        for (int j = 0; j < 2; j++) {
            __m512i p = _mm512_add_epi64(_mm512_mul_epi32(j ? _mm512_srli_epi64(a, 32) : a, m), av);
            __m512i v = _mm512_add_epi64(_mm512_sra_epi64(p, sh), z);
            r[j] = _mm512_min_epi64(_mm512_max_epi64(v, l), h);
        }
        __m512i v = _mm512_or_si512(r[0], _mm512_slli_epi64(r[1], 32));
        _mm_storeu_si128((__m128i *)(y + i), _mm512_cvtepi32_epi8(v));
    }
    return i;
}

/* 3x3 depthwise on flat rows: acc[i] = sum over taps t < 9 of wk[t] * src[t][i], i < n (a multiple of
 * 16, src readable that far). Codes widened to int16, tap pairs interleaved, vpmaddwd: exact int32. */
__attribute__((target("avx2")))
static void eml_dw9_avx2(const uint8_t *const *src, const int8_t *wk, int32_t n, int32_t *acc) {
    __m256i wv[5];
    for (int t = 0; t < 5; t++) {
        uint32_t a = (uint16_t)(int16_t)wk[2 * t], b = t < 4 ? (uint16_t)(int16_t)wk[2 * t + 1] : 0;
        wv[t] = _mm256_set1_epi32((int32_t)(a | b << 16));
    }
    for (int32_t i = 0; i < n; i += 16) {
        __m256i c0 = _mm256_setzero_si256(), c1 = _mm256_setzero_si256();
#pragma GCC unroll 5
        for (int t = 0; t < 5; t++) {
            __m128i xa = _mm_loadu_si128((const __m128i *)(src[2 * t] + i));
            __m128i xb = t < 4 ? _mm_loadu_si128((const __m128i *)(src[2 * t + 1] + i)) : _mm_setzero_si128();
            c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpacklo_epi8(xa, xb)), wv[t]));
            c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_cvtepu8_epi16(_mm_unpackhi_epi8(xa, xb)), wv[t]));
        }
        _mm256_storeu_si256((__m256i *)(acc + i), c0);
        _mm256_storeu_si256((__m256i *)(acc + i + 8), c1);
    }
}
/* the same with 32 outputs a pass: 256-bit unpacks work per 128-bit lane, so the two accumulators hold
 * outputs {0-7, 16-23} and {8-15, 24-31}; lane shuffles restore the order at the store */
__attribute__((target("avx512f,avx512bw")))
static void eml_dw9_avx512(const uint8_t *const *src, const int8_t *wk, int32_t n, int32_t *acc) {
    __m512i wv[5];
    for (int t = 0; t < 5; t++) {
        uint32_t a = (uint16_t)(int16_t)wk[2 * t], b = t < 4 ? (uint16_t)(int16_t)wk[2 * t + 1] : 0;
        wv[t] = _mm512_set1_epi32((int32_t)(a | b << 16));
    }
    int32_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512i c0 = _mm512_setzero_si512(), c1 = _mm512_setzero_si512();
#pragma GCC unroll 5
        for (int t = 0; t < 5; t++) {
            __m256i xa = _mm256_loadu_si256((const __m256i *)(src[2 * t] + i));
            __m256i xb = t < 4 ? _mm256_loadu_si256((const __m256i *)(src[2 * t + 1] + i)) : _mm256_setzero_si256();
            c0 = _mm512_add_epi32(c0, _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_unpacklo_epi8(xa, xb)), wv[t]));
            c1 = _mm512_add_epi32(c1, _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm256_unpackhi_epi8(xa, xb)), wv[t]));
        }
        _mm512_storeu_si512((void *)(acc + i), _mm512_shuffle_i64x2(c0, c1, 0x44));
        _mm512_storeu_si512((void *)(acc + i + 16), _mm512_shuffle_i64x2(c0, c1, 0xEE));
    }
    if (i < n) {
        const uint8_t *rest[9];
        for (int t = 0; t < 9; t++) rest[t] = src[t] + i;
        eml_dw9_avx2(rest, wk, n - i, acc + i);
    }
}
#endif /* EML_HOST && __x86_64__ */
