/* Winograd F(2x2, 3x3) for 3x3, stride 1, undilated, groups 1 convs (host build only), exact in
 * integers. With B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1], A^T = [1 1 1 0; 0 1 -1 -1] and
 * G' = 2 G = [2 0 0; 1 1 1; 1 -1 1; 0 0 2], every 2x2 output tile of the conv on the raw codes is
 *     4 * Y = A^T [ (G' g G'^T) (.) (B^T d B) ] A,
 * all integer: U = G' g G'^T (|U| <= 9 * 127, the generator's int16 table), V = B^T d B from raw
 * codes (|V| <= 4 * 255; padded taps hold zin, as in im2col), so U and V fit int16 and each product
 * and pair of products fits int32. The 16 GEMMs M = U . V and the output transform add in int32
 * modulo 2^32; that is a ring map, so A^T M A is 4 Y modulo 2^32 and, since 4 Y (the conv of raw
 * codes, times 4) fits int32, it is 4 Y exactly; Y = (4 Y) / 4 exactly, then beff folds zin and bias
 * as in eml_host.c. The 2.25x fewer multiplies come at int16 (not uint8) width.
 */
#if defined(EML_HOST)

typedef void (*eml_tile_s16_fn)(const int16_t *const *, int32_t, const int16_t *, int32_t, int32_t *);

/* V (16, cp / 2, tp, 2) int16 from the raw codes; channels >= c and tiles >= T are zeros */
static void eml_wino_input(const eml_conv_t *p, const uint8_t *x, int32_t cp, int32_t tp, int16_t *v) {
    int32_t tw = (p->wo + 1) / 2, T = ((p->ho + 1) / 2) * tw;
    int nthr = eml_nthr((int64_t)cp * tp * 64);
    (void)nthr;
#pragma omp parallel for schedule(static) num_threads(nthr)
    for (int32_t c2 = 0; c2 < cp / 2; c2++) {
        for (int32_t j = 0; j < 2; j++) {
            int32_t c = 2 * c2 + j;
            const uint8_t *xc = x + (int64_t)c * p->h * p->w;
            for (int32_t t = 0; t < tp; t++) {
                int32_t d[4][4], s[4][4];
                int32_t y0 = (t / tw) * 2 - p->ph, x0 = (t % tw) * 2 - p->pw;
                for (int32_t a = 0; a < 4; a++) {
                    for (int32_t e = 0; e < 4; e++) {
                        int32_t iy = y0 + a, ix = x0 + e;
                        int inside = c < p->c && t < T && iy >= 0 && iy < p->h && ix >= 0 && ix < p->w;
                        d[a][e] = c >= p->c || t >= T ? 0 : inside ? xc[(int64_t)iy * p->w + ix] : p->zin;
                    }
                }
                for (int32_t e = 0; e < 4; e++) {          /* B^T d, column by column */
                    s[0][e] = d[0][e] - d[2][e]; s[1][e] = d[1][e] + d[2][e];
                    s[2][e] = d[2][e] - d[1][e]; s[3][e] = d[1][e] - d[3][e];
                }
                for (int32_t a = 0; a < 4; a++) {          /* (B^T d) B, row by row */
                    int32_t r[4] = {s[a][0] - s[a][2], s[a][1] + s[a][2], s[a][2] - s[a][1], s[a][1] - s[a][3]};
                    for (int32_t e = 0; e < 4; e++)
                        v[(((int64_t)(4 * a + e) * (cp / 2) + c2) * tp + t) * 2 + j] = (int16_t)r[e];
                }
            }
        }
    }
}

/* M (16, o, tp) int32 = U (16, o, cp) . V, one GEMM per tile position */
static void eml_wino_gemm(int32_t o, int32_t cp, int32_t tp, const int16_t *u, const int16_t *v, int32_t *m) {
    eml_tile_s16_fn tile = eml_tile_s16_portable;
#if defined(EML_X86)
    int isa = eml_isa();
    tile = isa == EML_ISA_VNNI ? eml_tile_s16_vnni : isa == EML_ISA_AVX2 ? eml_tile_s16_avx2 : eml_tile_s16_portable;
#endif
    int32_t nt = tp / EML_NR, ob = (o + EML_MR - 1) / EML_MR;
    int nthr = eml_nthr((int64_t)16 * o * cp * tp);
    (void)nthr;
#pragma omp parallel for collapse(3) schedule(static) num_threads(nthr)
    for (int32_t xi = 0; xi < 16; xi++) {
        for (int32_t t = 0; t < nt; t++) {
            for (int32_t q = 0; q < ob; q++) {
                int32_t acc[EML_MR * EML_NR] __attribute__((aligned(64)));
                const int16_t *wr[EML_MR];
                int32_t rows = o - q * EML_MR < EML_MR ? o - q * EML_MR : EML_MR;
                for (int r = 0; r < EML_MR; r++)
                    wr[r] = u + ((int64_t)xi * o + q * EML_MR + (r < rows ? r : rows - 1)) * cp;
                tile(wr, cp / 2, v + (int64_t)xi * (cp / 2) * tp * 2 + (int64_t)t * EML_NR * 2, tp, acc);
                for (int r = 0; r < rows; r++)
                    memcpy(m + ((int64_t)xi * o + q * EML_MR + r) * tp + (int64_t)t * EML_NR, acc + EML_NR * r,
                           EML_NR * sizeof(int32_t));
            }
        }
    }
}

/* y = requant(A^T M A / 4 + beff) for every output of every tile */
static void eml_wino_output(const eml_conv_t *p, int32_t tp, const int32_t *m, const int64_t *beff,
                            const int32_t *m0, const int8_t *shift, uint8_t *y) {
    int32_t tw = (p->wo + 1) / 2, th = (p->ho + 1) / 2;
    int nthr = eml_nthr((int64_t)p->o * th * tw * 64);
    (void)nthr;
#pragma omp parallel for schedule(static) num_threads(nthr)
    for (int32_t o = 0; o < p->o; o++) {
        uint8_t *yo = y + (int64_t)o * p->ho * p->wo;
        for (int32_t t = 0; t < th * tw; t++) {
            uint32_t g[4][4], s[2][4];
            for (int32_t k = 0; k < 16; k++) g[k / 4][k % 4] = (uint32_t)m[((int64_t)k * p->o + o) * tp + t];
            for (int32_t e = 0; e < 4; e++) {              /* A^T M, modulo 2^32 */
                s[0][e] = g[0][e] + g[1][e] + g[2][e];
                s[1][e] = g[1][e] - g[2][e] - g[3][e];
            }
            int32_t oy = (t / tw) * 2, ox = (t % tw) * 2;
            for (int32_t a = 0; a < 2 && oy + a < p->ho; a++) {
                uint32_t r[2] = {s[a][0] + s[a][1] + s[a][2], s[a][1] - s[a][2] - s[a][3]};
                for (int32_t e = 0; e < 2 && ox + e < p->wo; e++) {
                    int64_t acc = (int64_t)((int32_t)r[e] / 4) + beff[o];   /* exact: 4 Y */
                    yo[(int64_t)(oy + a) * p->wo + ox + e] = eml_requant(acc, m0[o], shift[o], p->zout, p->lo, p->hi);
                }
            }
        }
    }
}

/* the conv: V at the start of scratch, M at the next 64-byte boundary (the generator sizes scratch
 * the same way: 32 cp tp + 64 o tp bytes, cp = c rounded up to even, tp = tiles rounded up to EML_NR) */
static void eml_winograd_host(const eml_conv_t *p, const uint8_t *x, const int16_t *u, const int64_t *beff,
                              const int32_t *m0, const int8_t *shift, uint8_t *y, uint8_t *scratch) {
    int32_t cp = eml_round_up(p->c, 2), tp = eml_round_up(((p->ho + 1) / 2) * ((p->wo + 1) / 2), EML_NR);
    int64_t vbytes = ((int64_t)32 * cp * tp + 63) / 64 * 64;
    int16_t *v = (int16_t *)scratch;
    int32_t *m = (int32_t *)(scratch + vbytes);
    eml_wino_input(p, x, cp, tp, v);
    eml_wino_gemm(p->o, cp, tp, u, v, m);
    eml_wino_output(p, tp, m, beff, m0, shift, y);
}
#endif /* EML_HOST */
