/* The AVX-512 VNNI path of qgemv.c (included there; isa = 2): two 32-weight blocks per 512-bit register
 * and one vpdpbusd (u8 × s8, four products summed into each int32 lane) where AVX2 needs maddubs + madd
 * on one block. Chosen at run time where the CPU has AVX512F/BW/VL and AVX512_VNNI, for K a multiple of
 * 64 (other K take the AVX2 path).
 *
 * 4-bit: 32 bytes of codes (blocks b, b+1) become [b lo | b+1 lo | b hi | b+1 hi] (16 codes each) with
 * one shift and one mask, so the activations are laid out to match once per call (permute_pairs), and
 * int32 lanes 0-3 and 8-11 belong to block b, 4-7 and 12-15 to b+1. 8-bit: codes are signed, vpdpbusd's
 * unsigned operand must be the weights, so q + 128 (one XOR with 0x80) goes in and 128·Σa is taken off
 * afterwards with the block sums already kept for the offsets; lanes 0-7 are block b, 8-15 block b+1.
 * The per-block scales d·e are spread onto the same lane pattern with one vpermps per weight row and
 * pair. */

#define V512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma"))) static inline

V512 __m512i pattern512(int bits) {  /* which of the pair's two scales each int32 lane takes */
    return bits == 4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                     : _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
}

V512 __m512 pair_scales(const float *d, __m512i idx) {  /* d[0], d[1] onto the lane pattern */
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd((const double *)d))));
}

V512 __m512i codes512(const uint8_t *q, int bits) {
    if (bits == 4) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)q);
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(raw), _mm256_srli_epi16(raw, 4), 1);
        return _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
    }
    return _mm512_xor_si512(_mm512_loadu_si512((const void *)q), _mm512_set1_epi8((char)0x80));
}

/* a (M, K) in block order → per pair of blocks [b[0:16] | b+1[0:16] | b[16:32] | b+1[16:32]] (4-bit). */
static void permute_pairs(const int8_t *a, int64_t M, int64_t K, int8_t *p) {
    for (int64_t r = 0; r < M * K; r += 2 * QK) {
        memcpy(p + r, a + r, 16);
        memcpy(p + r + 16, a + r + QK, 16);
        memcpy(p + r + 32, a + r + 16, 16);
        memcpy(p + r + 48, a + r + QK + 16, 16);
    }
}

/* e (M, nb) → ep (M, nb/2, 16): each pair's two activation scales on the lane pattern. */
V512 void spread_scales(const float *e, int64_t M, int64_t nb, int bits, float *ep) {
    const __m512i idx = pattern512(bits);
    for (int64_t r = 0; r < M * nb; r += 2) _mm512_storeu_ps(ep + r * 8, pair_scales(e + r, idx));
}

/* Weight rows 0 … R−1 against input rows 0 … MC−1, as tile_avx2 (compile-time R, MC at every call). */
V512 __attribute__((always_inline))
void tile512(const int R, const int MC, const int bits, const uint8_t *qs, const float *d, const float *m,
             const int8_t *a, const float *ep, const float *es, int64_t K, int64_t row_bytes, int64_t ahead,
             float *out, int64_t ldo) {
    const int64_t nb = K / QK, np = nb / 2, pb = bits == 4 ? QK : 2 * QK;  /* bytes of codes per pair */
    const __m512i idx = pattern512(bits), zero = _mm512_setzero_si512();
    __m512 acc[4][MC_MAX];
    for (int i = 0; i < R; i++)
        for (int r = 0; r < MC; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < np; p++) {
        __m512i q[4];
        __m512 dv[4];
        for (int i = 0; i < R; i++) {
            const uint8_t *qb = qs + i * row_bytes + p * pb;
            if (ahead) __builtin_prefetch(qb + ahead, 0, 3);
            q[i] = codes512(qb, bits);
            dv[i] = pair_scales(d + i * nb + 2 * p, idx);
        }
        for (int r = 0; r < MC; r++) {
            const __m512i av = _mm512_loadu_si512((const void *)(a + r * K + p * 2 * QK));
            const __m512 ev = _mm512_loadu_ps(ep + (r * np + p) * 16);
            for (int i = 0; i < R; i++) {
                const __m512 s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, q[i], av));
                acc[i][r] = _mm512_fmadd_ps(_mm512_mul_ps(dv[i], ev), s, acc[i][r]);
            }
        }
    }
    const float centre = bits == 8 ? -128.f : (m ? 0.f : -8.f);  /* the codes' offset, taken off via Σa */
    for (int i = 0; i < R; i++)
        for (int r = 0; r < MC; r++) {
            float t = _mm512_reduce_add_ps(acc[i][r]);
            if (m) t += offset_avx2(m + i * nb, es + r * nb, nb);
            if (centre != 0.f) t += centre * offset_avx2(d + i * nb, es + r * nb, nb);
            out[i * ldo + r] = t;
        }
}

V512 __attribute__((always_inline))
void rows512_(const int R, const int bits, const uint8_t *qs, const float *d, const float *m, const int8_t *a,
              const float *ep, const float *es, int64_t M, int64_t K, int64_t ahead, float *out) {
    const int64_t nb = K / QK, row_bytes = bits == 4 ? K / 2 : K;
#define TILE(R_, MC_) tile512(R_, MC_, bits, qs, d, m, a + r0 * K, ep + r0 * nb * 8, es + r0 * nb, K, row_bytes, \
                              pf, out + r0, M)
    for (int64_t r0 = 0; r0 < M; r0 += MC_MAX) {
        const int64_t mc = M - r0 < MC_MAX ? M - r0 : MC_MAX;
        const int64_t pf = r0 == 0 ? ahead : 0;
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

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")))
static void rows512(const int R, const uint8_t *qs, const float *d, const float *m, int bits, const int8_t *a,
                    const float *ep, const float *es, int64_t M, int64_t K, int64_t ahead, float *out) {
#define ROWS(R_, B_) rows512_(R_, B_, qs, d, m, a, ep, es, M, K, ahead, out)
    if (bits == 4) {
        if (R == 4) ROWS(4, 4); else if (R == 2) ROWS(2, 4); else ROWS(1, 4);
    } else {
        if (R == 4) ROWS(4, 8); else if (R == 2) ROWS(2, 8); else ROWS(1, 8);
    }
#undef ROWS
}
