/* Fast host kernels, continued (EML_HOST only): depthwise, max-pool and fully connected layers, on
 * the runtime, requantization rows and ISA clones of eml_host.c. */
#if defined(EML_HOST)
/* the padded plane's size: every tap of every output inside it */
static void eml_dw_dims(const eml_conv_t *p, int32_t *hp, int32_t *wp) {
    *hp = (p->ho - 1) * p->sh + (p->kh - 1) * p->dh + 1;
    *wp = (p->wo - 1) * p->sw + (p->kw - 1) * p->dw + 1;
}

/* depthwise: every channel copied into a zin-padded plane first (so y may be x: in place), then
 * rows of outputs without bounds checks */
static void eml_depthwise_host(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int64_t *beff,
                               const int32_t *m0, const int8_t *shift, uint8_t *y, uint8_t *scratch) {
    int32_t hp, wp, kk = p->kh * p->kw, isa = eml_isa();
    eml_dw_dims(p, &hp, &wp);
    eml_rq_fn rq = eml_rq_pick(isa);
    void (*dw)(EML_DW_ARGS) = eml_dw_portable;
#if defined(EML_X86)
    dw = isa == EML_ISA_VNNI ? eml_dw_avx512 : isa == EML_ISA_AVX2 ? eml_dw_avx2 : eml_dw_portable;
#endif
    int nthr = eml_nthr((int64_t)p->c * p->ho * p->wo * kk * 4);
    (void)nthr;
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t k = 0; k < p->c; k++) {
        uint8_t *xp = scratch + (int64_t)k * hp * wp;
        const uint8_t *xc = x + (int64_t)k * p->h * p->w;
        for (int32_t py = 0; py < hp; py++) {
            int32_t iy = py - p->ph;
            uint8_t *d = xp + (int64_t)py * wp;
            for (int32_t px = 0; px < wp; px++) {
                int32_t ix = px - p->pw;
                d[px] = (iy < 0 || iy >= p->h || ix < 0 || ix >= p->w) ? (uint8_t)p->zin : xc[(int64_t)iy * p->w + ix];
            }
        }
    }
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t k = 0; k < p->c; k++) {
        int32_t acc[256] __attribute__((aligned(64)));
        const uint8_t *xp = scratch + (int64_t)k * hp * wp;
        uint8_t *yk = y + (int64_t)k * p->ho * p->wo;
        for (int32_t oy = 0; oy < p->ho; oy++) {
            for (int32_t ox = 0; ox < p->wo; ox += 256) {
                int32_t n = p->wo - ox < 256 ? p->wo - ox : 256;
                dw(p, xp + (int64_t)oy * p->sh * wp + (int64_t)ox * p->sw, wp, w + k * kk, n, acc);
                rq(acc, n, beff[k], m0[k], shift[k], p->zout, p->lo, p->hi, yk + (int64_t)oy * p->wo + ox);
            }
        }
    }
}

/* max-pool without padding (every tap inside: no bounds checks), rows of outputs at once */
static inline __attribute__((always_inline)) void eml_mp_body(const eml_pool_t *p, const uint8_t *xc, uint8_t *yc) {
    for (int32_t oy = 0; oy < p->ho; oy++) {
        uint8_t *d = yc + (int64_t)oy * p->wo;
        for (int32_t ox = 0; ox < p->wo; ox++) d[ox] = 0;
        for (int32_t ky = 0; ky < p->kh; ky++) {
            for (int32_t kx = 0; kx < p->kw; kx++) {
                const uint8_t *r = xc + (int64_t)(oy * p->sh + ky * p->dh) * p->w + kx * p->dw;
                if (p->sw == 2) {
                    for (int32_t ox = 0; ox < p->wo; ox++) d[ox] = r[2 * ox] > d[ox] ? r[2 * ox] : d[ox];
                } else {
                    for (int32_t ox = 0; ox < p->wo; ox++) d[ox] = r[ox * p->sw] > d[ox] ? r[ox * p->sw] : d[ox];
                }
            }
        }
    }
}

static void eml_mp_portable(const eml_pool_t *p, const uint8_t *xc, uint8_t *yc) { eml_mp_body(p, xc, yc); }
#if defined(EML_X86)
__attribute__((target("avx2"))) static void eml_mp_avx2(const eml_pool_t *p, const uint8_t *xc, uint8_t *yc) {
    eml_mp_body(p, xc, yc);
}
#endif

static void eml_maxpool_host(const eml_pool_t *p, const uint8_t *x, uint8_t *y) {
    if (p->ph != 0 || p->pw != 0) {
        eml_maxpool(p, x, y);
        return;
    }
    void (*mp)(const eml_pool_t *, const uint8_t *, uint8_t *) = eml_mp_portable;
#if defined(EML_X86)
    if (eml_isa() >= EML_ISA_AVX2) mp = eml_mp_avx2;
#endif
    int nthr = eml_nthr((int64_t)p->c * p->ho * p->wo * p->kh * p->kw * 4);
    (void)nthr;
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t k = 0; k < p->c; k++) mp(p, x + (int64_t)k * p->h * p->w, y + (int64_t)k * p->ho * p->wo);
}

/* fully connected: raw codes times weights (zin is in beff), one dot product per output */
static void eml_linear_host(int32_t rows, int32_t f, int32_t o, const uint8_t *x, const int8_t *w,
                            const int64_t *beff, const int32_t *m0, const int8_t *shift,
                            int32_t zout, int32_t lo, int32_t hi, uint8_t *y) {
    int isa = eml_isa();
    int nthr = eml_nthr((int64_t)rows * f * o);
    (void)nthr, (void)isa;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t r = 0; r < rows; r++) {
        for (int32_t j = 0; j < o; j++) {
            const uint8_t *xr = x + (int64_t)r * f;
            const int8_t *wr = w + (int64_t)j * f;
            int32_t acc = 0;
#if defined(EML_X86)
            if (isa == EML_ISA_VNNI) acc = eml_dot_u8_vnni(xr, wr, f);
            else if (isa == EML_ISA_AVX2) acc = eml_dot_u8_avx2(xr, wr, f);
            else
#endif
                for (int32_t i = 0; i < f; i++) acc += (int32_t)xr[i] * wr[i];
            y[(int64_t)r * o + j] = eml_requant((int64_t)acc + beff[j], m0[j], shift[j], zout, lo, hi);
        }
    }
}
#endif /* EML_HOST */
