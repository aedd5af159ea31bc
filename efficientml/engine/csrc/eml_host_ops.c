/* Fast host kernels, continued (EML_HOST only): depthwise (3x3 stride 1/2 on flat phase planes with
 * AVX2 / AVX-512 taps from eml_x86.c, other shapes on padded planes), max-pool and fully connected
 * layers, on the runtime, requantization rows and ISA clones of eml_host.c. */
#if defined(EML_HOST)
/* the padded plane's size: every tap of every output inside it */
static void eml_dw_dims(const eml_conv_t *p, int32_t *hp, int32_t *wp) {
    *hp = (p->ho - 1) * p->sh + (p->kh - 1) * p->dh + 1;
    *wp = (p->wo - 1) * p->sw + (p->kw - 1) * p->dw + 1;
}

/* 3x3 depthwise, stride 1 or 2, undilated ("flat" planes): each channel's zin-padded plane is split
 * into s x s phase planes, phase (a, b) holding padded pixel (s r + a, s c + b), rows of a common
 * pitch wq = wo + 2 / s, rows ho + 2 / s of them. Tap (ky, kx) of output (oy, ox) is then phase
 * (ky % s, kx % s) at flat index oy wq + ox + (ky / s) wq + kx / s: a whole plane runs as one long row
 * of oy wq + ox, the columns ox >= wo computed and dropped. Channel slots end in 64 spare bytes. */
static int eml_dw3_ok(const eml_conv_t *p) {
    return p->kh == 3 && p->kw == 3 && p->dh == 1 && p->dw == 1 && p->sh == p->sw && (p->sh == 1 || p->sh == 2);
}

static int64_t eml_dw3_dims(const eml_conv_t *p, int32_t *rows, int32_t *wq) {
    *rows = p->ho + 2 / p->sh;
    *wq = p->wo + 2 / p->sh;
    return (int64_t)p->sh * p->sh * *rows * *wq + 64;
}

/* n bytes in fixed-size pieces (inline moves, no call per short row); dst and src do not overlap */
static inline __attribute__((always_inline)) void eml_copy_short(uint8_t *dst, const uint8_t *src, int32_t n) {
    if (n >= 16) {
        for (int32_t i = 0; i + 16 <= n; i += 16) memcpy(dst + i, src + i, 16);
        memcpy(dst + n - 16, src + n - 16, 16);
    } else if (n >= 4) {
        for (int32_t i = 0; i + 4 <= n; i += 4) memcpy(dst + i, src + i, 4);
        memcpy(dst + n - 4, src + n - 4, 4);
    } else {
        for (int32_t i = 0; i < n; i++) dst[i] = src[i];
    }
}

static inline __attribute__((always_inline)) void eml_dw3_fill_body(const eml_conv_t *p, const uint8_t *xc,
                                                                    int32_t rows, int32_t wq, uint8_t *dst) {
    int32_t s = p->sh;
    for (int32_t ab = 0; ab < s * s; ab++) {
        int32_t a = ab / s, b = ab % s, c0 = 0, c1;
        uint8_t *ph = dst + (int64_t)ab * rows * wq;
        while (c0 < wq && s * c0 + b - p->pw < 0) c0++;          /* columns c0 <= c < c1 lie inside x */
        for (c1 = c0; c1 < wq && s * c1 + b - p->pw < p->w; c1++) {}
        for (int32_t r = 0; r < rows; r++) {
            uint8_t *d = ph + (int64_t)r * wq;
            int32_t iy = s * r + a - p->ph;
            if (iy < 0 || iy >= p->h) {
                memset(d, p->zin, (size_t)wq);
                continue;
            }
            const uint8_t *src = xc + (int64_t)iy * p->w + (s * c0 + b - p->pw);
            for (int32_t c = 0; c < c0; c++) d[c] = (uint8_t)p->zin;
            if (s == 1) eml_copy_short(d + c0, src, c1 - c0);
            else for (int32_t c = c0; c < c1; c++) d[c] = src[2 * (c - c0)];
            for (int32_t c = c1; c < wq; c++) d[c] = (uint8_t)p->zin;
        }
    }
    memset(dst + (int64_t)s * s * rows * wq, p->zin, 64);
}

typedef void (*eml_dw3_fill_fn)(const eml_conv_t *, const uint8_t *, int32_t, int32_t, uint8_t *);
static void eml_dw3_fill_portable(const eml_conv_t *p, const uint8_t *xc, int32_t rows, int32_t wq, uint8_t *dst) {
    eml_dw3_fill_body(p, xc, rows, wq, dst);
}
#if defined(EML_X86)
__attribute__((target("avx2")))
static void eml_dw3_fill_avx2(const eml_conv_t *p, const uint8_t *xc, int32_t rows, int32_t wq, uint8_t *dst) {
    eml_dw3_fill_body(p, xc, rows, wq, dst);
}
#endif

/* portable flat 3x3 taps: the contract of eml_dw9_avx2 (eml_x86.c) */
static void eml_dw9_portable(const uint8_t *const *src, const int8_t *wk, int32_t n, int32_t *acc) {
    for (int32_t i = 0; i < n; i++) acc[i] = 0;
    for (int t = 0; t < 9; t++) {
        const uint8_t *r = src[t];
        int32_t wv = wk[t];
        for (int32_t i = 0; i < n; i++) acc[i] += wv * r[i];
    }
}

#define EML_DW3_CH 512
typedef void (*eml_dw9_fn)(const uint8_t *const *, const int8_t *, int32_t, int32_t *);

static void eml_dw3_chan(const eml_conv_t *p, const uint8_t *xp, int32_t rows, int32_t wq, const int8_t *wk,
                         int64_t beff, int32_t m0, int32_t shift, eml_dw9_fn dw9, eml_rq_fn rq, uint8_t *yk) {
    int32_t s = p->sh, total = p->ho * wq;
    int32_t acc[EML_DW3_CH] __attribute__((aligned(64)));
    uint8_t t8[EML_DW3_CH];
    const uint8_t *src[9];
    for (int32_t i0 = 0; i0 < total; i0 += EML_DW3_CH) {
        int32_t n = total - i0 < EML_DW3_CH ? total - i0 : EML_DW3_CH;
        for (int32_t ky = 0; ky < 3; ky++)
            for (int32_t kx = 0; kx < 3; kx++)
                src[3 * ky + kx] = xp + (int64_t)((ky % s) * s + kx % s) * rows * wq + (ky / s) * wq + kx / s + i0;
        dw9(src, wk, eml_round_up(n, 16), acc);
        rq(acc, n, beff, m0, shift, p->zout, p->lo, p->hi, t8);
        for (int32_t oy = i0 / wq; oy * wq < i0 + n; oy++) {          /* the valid columns of each row */
            int32_t a = oy * wq > i0 ? oy * wq : i0, b = oy * wq + p->wo < i0 + n ? oy * wq + p->wo : i0 + n;
            if (b > a) eml_copy_short(yk + (int64_t)oy * p->wo + (a - oy * wq), t8 + (a - i0), b - a);
        }
    }
}

static void eml_dw3_host(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int64_t *beff,
                         const int32_t *m0, const int8_t *shift, uint8_t *y, uint8_t *scratch, int isa) {
    int32_t rows, wq;
    int64_t slot = eml_dw3_dims(p, &rows, &wq);
    eml_rq_fn rq = eml_rq_pick(isa);
    eml_dw9_fn dw9 = eml_dw9_portable;
    eml_dw3_fill_fn fill = eml_dw3_fill_portable;
#if defined(EML_X86)
    if (isa >= EML_ISA_AVX2) dw9 = eml_dw9_avx2, fill = eml_dw3_fill_avx2;
    if (isa == EML_ISA_VNNI) dw9 = eml_dw9_avx512;
#endif
    int nthr = eml_nthr((int64_t)p->c * p->ho * p->wo * 36);
    (void)nthr;
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t k = 0; k < p->c; k++) fill(p, x + (int64_t)k * p->h * p->w, rows, wq, scratch + k * slot);
#pragma omp parallel for schedule(static) num_threads(nthr) if (nthr > 1)
    for (int32_t k = 0; k < p->c; k++)
        eml_dw3_chan(p, scratch + k * slot, rows, wq, w + 9 * k, beff[k], m0[k], shift[k], dw9, rq,
                     y + (int64_t)k * p->ho * p->wo);
}

/* depthwise: every channel copied into a zin-padded plane first (so y may be x: in place), then
 * rows of outputs without bounds checks */
static void eml_depthwise_host(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int64_t *beff,
                               const int32_t *m0, const int8_t *shift, uint8_t *y, uint8_t *scratch) {
    int32_t hp, wp, kk = p->kh * p->kw, isa = eml_isa();
    if (eml_dw3_ok(p)) {
        eml_dw3_host(p, x, w, beff, m0, shift, y, scratch, isa);
        return;
    }
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
