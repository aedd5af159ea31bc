/* Fast kernels of the host build (compiled only with -DEML_HOST; a microcontroller build keeps the
 * direct loops of eml_kernels.c and their memory budget). Same integer results, bit for bit:
 *
 * - Zero points: the inner loops multiply raw uint8 codes by int8 weights; the input zero point is
 *   folded into the bias, beff[o] = bias[o] - zin * sum_k w[o][k] (int64, from the generator), and
 *   every padded tap holds the code zin, so it contributes zin * w and cancels exactly.
 * - Convolutions are GEMMs, y (o, p) = w (o, kp) . B (kp, p): 1x1 convs read the input as B, other
 *   convs an im2col copy of it; B is packed in groups of 4 k for 32-column tiles (eml_x86.c).
 * - Code paths: portable C (auto-vectorised for the baseline ISA), AVX2, AVX-512 VNNI, chosen once
 *   from the CPU's flags (or forced by <prefix>_set_isa, the EFFICIENTML_ENGINE_ISA variable of the
 *   Python side). Row-wise loops written once in C are cloned per ISA with target attributes.
 * - Threads: OpenMP over tiles, channels or rows, eml_threads of them (<prefix>_set_threads).
 */
#if defined(EML_HOST)
#if defined(_OPENMP)
#include <omp.h>
#endif

enum { EML_ISA_PORTABLE = 0, EML_ISA_AVX2 = 1, EML_ISA_VNNI = 2 };
static int eml_isa_sel = -1;
static int eml_threads = 1;
#define EML_NR 32   /* columns per GEMM tile (B is padded to a multiple) */
#define EML_MR 8    /* rows per GEMM tile */
#define EML_PAR_MIN 200000  /* multiply-adds below which a kernel stays on one thread */

static int eml_isa_best(void) {
#if defined(EML_X86)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return EML_ISA_VNNI;
    if (__builtin_cpu_supports("avx2")) return EML_ISA_AVX2;
#endif
    return EML_ISA_PORTABLE;
}

/* the path in use: `want` (-1: the best this CPU has), never above what the CPU has */
static int eml_set_isa(int want) {
    int best = eml_isa_best();
    eml_isa_sel = want < 0 || want > best ? best : want;
    return eml_isa_sel;
}

static int eml_isa(void) {
    return eml_isa_sel < 0 ? eml_set_isa(-1) : eml_isa_sel;
}

static int eml_nthr(int64_t work) {
    return work < EML_PAR_MIN ? 1 : eml_threads;
}

/* requantize n int32 accumulators of one output channel (raw codes x weights; beff folds zin);
 * vec: 1 AVX2, 2 AVX-512 lanes for the common shifts (eml_x86.c), the scalar formula for the rest */
static inline __attribute__((always_inline)) void eml_rq_body(const int32_t *acc, int32_t n, int64_t beff, int32_t m0,
                                                              int32_t shift, int32_t zout, int32_t lo, int32_t hi,
                                                              uint8_t *y, int vec) {
    if (shift < 1 || shift > 62) {
        for (int32_t i = 0; i < n; i++) y[i] = eml_requant((int64_t)acc[i] + beff, m0, shift, zout, lo, hi);
        return;
    }
    /* (acc + beff) * m0 + half == acc * m0 + (beff * m0 + half) modulo 2^64, as the reference wraps */
    uint64_t add = (uint64_t)beff * (uint64_t)(int64_t)m0 + ((uint64_t)1 << (shift - 1));
    int32_t i = 0;
#if defined(EML_X86)
    if (vec && lo >= 0 && hi <= 255)
        i = vec == 2 ? eml_rq_vec_avx512(acc, n, add, m0, shift, zout, lo, hi, y)
                     : eml_rq_vec_avx2(acc, n, add, m0, shift, zout, lo, hi, y);
#endif
    (void)vec;
    for (; i < n; i++) {
        int64_t prod = (int64_t)((uint64_t)((int64_t)acc[i] * m0) + add);
        int64_t v = (prod >> shift) + zout;
        v = v < lo ? lo : v;
        v = v > hi ? hi : v;
        y[i] = (uint8_t)v;
    }
}

/* depthwise: acc[i] += w[tap] * xp[row + i * sw + tap offset] over the taps, for n outputs of a row */
static inline __attribute__((always_inline)) void eml_dw_body(const eml_conv_t *p, const uint8_t *xr, int32_t wp,
                                                              const int8_t *wk, int32_t n, int32_t *acc) {
    for (int32_t i = 0; i < n; i++) acc[i] = 0;
    for (int32_t ky = 0; ky < p->kh; ky++) {
        for (int32_t kx = 0; kx < p->kw; kx++) {
            const uint8_t *r = xr + (int64_t)ky * p->dh * wp + kx * p->dw;
            int32_t wv = wk[ky * p->kw + kx];
            if (p->sw == 1) {
                for (int32_t i = 0; i < n; i++) acc[i] += wv * r[i];
            } else if (p->sw == 2) {
                for (int32_t i = 0; i < n; i++) acc[i] += wv * r[2 * i];
            } else {
                for (int32_t i = 0; i < n; i++) acc[i] += wv * r[(int64_t)i * p->sw];
            }
        }
    }
}

#define EML_RQ_ARGS const int32_t *acc, int32_t n, int64_t beff, int32_t m0, int32_t shift, int32_t zout, \
    int32_t lo, int32_t hi, uint8_t *y
#define EML_DW_ARGS const eml_conv_t *p, const uint8_t *xr, int32_t wp, const int8_t *wk, int32_t n, int32_t *acc
static void eml_rq_portable(EML_RQ_ARGS) { eml_rq_body(acc, n, beff, m0, shift, zout, lo, hi, y, 0); }
static void eml_dw_portable(EML_DW_ARGS) { eml_dw_body(p, xr, wp, wk, n, acc); }
#if defined(EML_X86)
__attribute__((target("avx2"))) static void eml_rq_avx2(EML_RQ_ARGS) {
    eml_rq_body(acc, n, beff, m0, shift, zout, lo, hi, y, 1);
}
__attribute__((target("avx2"))) static void eml_dw_avx2(EML_DW_ARGS) { eml_dw_body(p, xr, wp, wk, n, acc); }
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void eml_rq_avx512(EML_RQ_ARGS) {
    eml_rq_body(acc, n, beff, m0, shift, zout, lo, hi, y, 2);
}
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void eml_dw_avx512(EML_DW_ARGS) {
    eml_dw_body(p, xr, wp, wk, n, acc);
}
#endif

typedef void (*eml_rq_fn)(EML_RQ_ARGS);
static eml_rq_fn eml_rq_pick(int isa) {
#if defined(EML_X86)
    if (isa == EML_ISA_VNNI) return eml_rq_avx512;
    if (isa == EML_ISA_AVX2) return eml_rq_avx2;
#endif
    (void)isa;
    return eml_rq_portable;
}

/* portable GEMM tiles: the same contract as the x86 ones (eml_x86.c) */
static void eml_tile_u8_portable(const int8_t *const *wr, int32_t kq, const uint8_t *b, int32_t pp, int32_t *acc) {
    int32_t c[EML_MR * EML_NR] = {0};    /* a local array: no aliasing with the uint8 loads, so it vectorises */
    for (int32_t q = 0; q < kq; q++) {
        const uint8_t *bq = b + (int64_t)q * pp * 4;
        for (int r = 0; r < EML_MR; r++) {
            const int8_t *w = wr[r] + 4 * q;
            int32_t w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], *a = c + EML_NR * r;
            for (int n = 0; n < EML_NR; n++)
                a[n] += w0 * bq[4 * n] + w1 * bq[4 * n + 1] + w2 * bq[4 * n + 2] + w3 * bq[4 * n + 3];
        }
    }
    memcpy(acc, c, sizeof(c));
}

/* int16 products summed modulo 2^32 (exact for the final Winograd outputs, see eml_winograd.c) */
static void eml_tile_s16_portable(const int16_t *const *wr, int32_t kq, const int16_t *b, int32_t pp, int32_t *acc) {
    uint32_t u[EML_MR * EML_NR] = {0};
    for (int32_t q = 0; q < kq; q++) {
        const int16_t *bq = b + (int64_t)q * pp * 2;
        for (int r = 0; r < EML_MR; r++) {
            int32_t w0 = wr[r][2 * q], w1 = wr[r][2 * q + 1];
            uint32_t *a = u + EML_NR * r;
            for (int n = 0; n < EML_NR; n++) a[n] += (uint32_t)(w0 * bq[2 * n]) + (uint32_t)(w1 * bq[2 * n + 1]);
        }
    }
    for (int32_t i = 0; i < EML_MR * EML_NR; i++) acc[i] = (int32_t)u[i];
}

typedef void (*eml_tile_u8_fn)(const int8_t *const *, int32_t, const uint8_t *, int32_t, int32_t *);
static eml_tile_u8_fn eml_tile_u8_pick(int isa, int safe) {
#if defined(EML_X86)
    if (isa == EML_ISA_VNNI) return eml_tile_u8_vnni;
    if (isa == EML_ISA_AVX2 && safe) return eml_tile_u8_avx2;
#endif
    (void)isa, (void)safe;
    return eml_tile_u8_portable;
}

typedef struct {
    int32_t o, kp, p, pp;        /* rows, k (multiple of 4), columns, packed columns (multiple of EML_NR) */
    int32_t zout, lo, hi, safe;  /* safe: every |w| <= 64 (AVX2's saturating pairs are exact) */
} eml_gemm_t;

/* y (o, p) = requant(w (o, kp) . b + beff), b packed (kp / 4, pp, 4); tiles over threads */
static void eml_gemm_u8(const eml_gemm_t *g, const int8_t *w, const uint8_t *b, const int64_t *beff,
                        const int32_t *m0, const int8_t *shift, uint8_t *y) {
    int isa = eml_isa();
    eml_tile_u8_fn tile = eml_tile_u8_pick(isa, g->safe);
    eml_rq_fn rq = eml_rq_pick(isa);
    int32_t nt = g->pp / EML_NR, ob = (g->o + EML_MR - 1) / EML_MR;
    int nthr = eml_nthr((int64_t)g->o * g->kp * g->p);
    (void)nthr;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t t = 0; t < nt; t++) {
        for (int32_t q = 0; q < ob; q++) {
            int32_t acc[EML_MR * EML_NR] __attribute__((aligned(64)));
            const int8_t *wr[EML_MR];
            int32_t rows = g->o - q * EML_MR < EML_MR ? g->o - q * EML_MR : EML_MR;
            int32_t n = g->p - t * EML_NR < EML_NR ? g->p - t * EML_NR : EML_NR;
            for (int r = 0; r < EML_MR; r++) wr[r] = w + (int64_t)(q * EML_MR + (r < rows ? r : rows - 1)) * g->kp;
            tile(wr, g->kp / 4, b + (int64_t)t * EML_NR * 4, g->pp, acc);
            for (int r = 0; r < rows; r++) {
                int32_t oo = q * EML_MR + r;
                rq(acc + EML_NR * r, n, beff[oo], m0[oo], shift[oo], g->zout, g->lo, g->hi,
                   y + (int64_t)oo * g->p + (int64_t)t * EML_NR);
            }
        }
    }
}

/* 4 rows of n codes interleaved into B's (n, 4) layout: dst[4 q + j] = row j [q] */
static inline __attribute__((always_inline)) void eml_il4_body(const uint8_t *r0, const uint8_t *r1, const uint8_t *r2,
                                                               const uint8_t *r3, int32_t n, uint8_t *dst) {
    for (int32_t q = 0; q < n; q++) {
        dst[4 * q] = r0[q];
        dst[4 * q + 1] = r1[q];
        dst[4 * q + 2] = r2[q];
        dst[4 * q + 3] = r3[q];
    }
}

#define EML_IL4_ARGS const uint8_t *r0, const uint8_t *r1, const uint8_t *r2, const uint8_t *r3, int32_t n, uint8_t *dst
static void eml_il4_portable(EML_IL4_ARGS) { eml_il4_body(r0, r1, r2, r3, n, dst); }
#if defined(EML_X86)
__attribute__((target("avx2"))) static void eml_il4_avx2(EML_IL4_ARGS) { eml_il4_body(r0, r1, r2, r3, n, dst); }
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi"))) static void eml_il4_avx512(EML_IL4_ARGS) {
    eml_il4_body(r0, r1, r2, r3, n, dst);
}
#endif

typedef void (*eml_il4_fn)(EML_IL4_ARGS);
static eml_il4_fn eml_il4_pick(void) {
#if defined(EML_X86)
    int isa = eml_isa();
    if (isa == EML_ISA_VNNI && __builtin_cpu_supports("avx512vbmi")) return eml_il4_avx512;
    if (isa >= EML_ISA_AVX2) return eml_il4_avx2;
#endif
    return eml_il4_portable;
}

/* one group's input, zin-padded, channels in fours: xi (cg4, hp, wp, 4), channels past cg hold 0
 * (their weights are 0); zero: w zero codes */
static void eml_pack_planes(const eml_conv_t *p, const uint8_t *x, int32_t cg, int32_t hp, int32_t wp,
                            uint8_t *xi, const uint8_t *zero) {
    eml_il4_fn il4 = eml_il4_pick();
    int32_t cg4 = (cg + 3) / 4, lo = p->pw, hi = p->w + p->pw < wp ? p->w + p->pw : wp;
    int nthr = eml_nthr((int64_t)cg4 * hp * wp * 32);
    (void)nthr;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t c4 = 0; c4 < cg4; c4++) {
        for (int32_t py = 0; py < hp; py++) {
            uint8_t *d = xi + ((int64_t)c4 * hp + py) * wp * 4;
            int32_t iy = py - p->ph;
            if (iy < 0 || iy >= p->h || hi <= lo) {
                memset(d, p->zin, (size_t)wp * 4);
                continue;
            }
            const uint8_t *r[4];
            for (int32_t j = 0; j < 4; j++)
                r[j] = 4 * c4 + j < cg ? x + ((int64_t)(4 * c4 + j) * p->h + iy) * p->w + (lo - p->pw) : zero;
            memset(d, p->zin, (size_t)lo * 4);
            il4(r[0], r[1], r[2], r[3], hi - lo, d + 4 * lo);
            memset(d + 4 * hi, p->zin, (size_t)(wp - hi) * 4);
            if (4 * c4 + 3 >= cg)                    /* missing channels: 0 in the padding too */
                for (int32_t q = 0; q < wp; q++)
                    for (int32_t j = cg - 4 * c4; j < 4; j++) d[4 * q + j] = 0;
        }
    }
}

/* im2col from the padded planes into B (kp / 4, pp, 4), k = ((ky, kx), c4, j): each group of 4 is
 * one pixel's 4 channels, so a row of outputs is one copy (stride 1) */
static void eml_pack_im2col(const eml_conv_t *p, const uint8_t *xi, int32_t cg4, int32_t hp, int32_t wp,
                            int32_t pp, uint8_t *b) {
    int32_t P = p->ho * p->wo, nq = p->kh * p->kw * cg4;
    int nthr = eml_nthr((int64_t)nq * pp * 16);
    (void)nthr;
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t q = 0; q < nq; q++) {
        int32_t tap = q / cg4, c4 = q % cg4, ky = tap / p->kw, kx = tap % p->kw;
        uint8_t *dst = b + (int64_t)q * pp * 4;
        for (int32_t oy = 0; oy < p->ho; oy++) {
            const uint8_t *src = xi + (((int64_t)c4 * hp + oy * p->sh + ky * p->dh) * wp + kx * p->dw) * 4;
            uint8_t *d = dst + (int64_t)oy * p->wo * 4;
            if (p->sw == 1) {
                memcpy(d, src, (size_t)p->wo * 4);
            } else {
                for (int32_t ox = 0; ox < p->wo; ox++) memcpy(d + 4 * ox, src + (int64_t)ox * p->sw * 4, 4);
            }
        }
        memset(dst + 4 * (int64_t)P, p->zin, (size_t)(4 * (pp - P)));
    }
}

/* the (c, P) input of a 1x1 conv as B (kp / 4, pp, 4); zero: P zero codes (for rows past c) */
static void eml_pack_rows(const uint8_t *x, int32_t c, int32_t P, int32_t kp, int32_t pp, uint8_t *b,
                          const uint8_t *zero) {
    eml_il4_fn il4 = eml_il4_pick();
    int nthr = eml_nthr((int64_t)kp * pp * 8);
    (void)nthr;
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t k4 = 0; k4 < kp / 4; k4++) {
        const uint8_t *r[4];
        for (int32_t j = 0; j < 4; j++) r[j] = 4 * k4 + j < c ? x + (int64_t)(4 * k4 + j) * P : zero;
        uint8_t *dst = b + (int64_t)k4 * pp * 4;
        il4(r[0], r[1], r[2], r[3], P, dst);
        memset(dst + 4 * (int64_t)P, 0, (size_t)(4 * (pp - P)));
    }
}

static int32_t eml_round_up(int32_t v, int32_t m) { return (v + m - 1) / m * m; }
static void eml_dw_dims(const eml_conv_t *p, int32_t *hp, int32_t *wp);

/* any conv as im2col + GEMM, group by group; w: o rows of kp = kh kw round_up(cg, 4) int8 in the
 * order ((ky, kx), ci) (the generator's); scratch: planes (round_up(cg, 4) hp wp), B (kp pp), w zeros */
static void eml_conv2d_host(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int64_t *beff,
                            const int32_t *m0, const int8_t *shift, int32_t safe, uint8_t *y, uint8_t *scratch) {
    int32_t cg = p->c / p->groups, og = p->o / p->groups, P = p->ho * p->wo, hp, wp;
    eml_dw_dims(p, &hp, &wp);
    int32_t cg4 = (cg + 3) / 4;
    eml_gemm_t g = {og, p->kh * p->kw * cg4 * 4, P, eml_round_up(P, EML_NR), p->zout, p->lo, p->hi, safe};
    uint8_t *xi = scratch, *b = scratch + (int64_t)cg4 * 4 * hp * wp, *zero = b + (int64_t)g.kp * g.pp;
    memset(zero, 0, (size_t)p->w);
    for (int32_t gi = 0; gi < p->groups; gi++) {
        eml_pack_planes(p, x + (int64_t)gi * cg * p->h * p->w, cg, hp, wp, xi, zero);
        eml_pack_im2col(p, xi, cg4, hp, wp, g.pp, b);
        int64_t o0 = (int64_t)gi * og;
        eml_gemm_u8(&g, w + o0 * g.kp, b, beff + o0, m0 + o0, shift + o0, y + o0 * P);
    }
}

/* 1x1, stride 1, no padding: the input is B already, only packed; scratch: kp pp + pp bytes */
static void eml_pointwise_host(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int64_t *beff,
                               const int32_t *m0, const int8_t *shift, int32_t safe, uint8_t *y, uint8_t *scratch) {
    int32_t P = p->h * p->w;
    eml_gemm_t g = {p->o, eml_round_up(p->c, 4), P, eml_round_up(P, EML_NR), p->zout, p->lo, p->hi, safe};
    uint8_t *zero = scratch + (int64_t)g.kp * g.pp;
    memset(zero, 0, (size_t)P);
    eml_pack_rows(x, p->c, P, g.kp, g.pp, scratch, zero);
    eml_gemm_u8(&g, w, scratch, beff, m0, shift, y);
}

#endif /* EML_HOST */
