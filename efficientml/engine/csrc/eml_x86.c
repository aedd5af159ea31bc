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
#endif /* EML_HOST && __x86_64__ */
