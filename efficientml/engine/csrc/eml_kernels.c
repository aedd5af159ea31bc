/* efficientml engine: portable int8 kernels for integer-only CNNs (NCHW, batch 1).
 *
 * Activations are uint8 codes q with real value S*(q - Z); weights are symmetric int8 per output
 * channel; accumulation is int32 over (q_x - Z_x) * q_w, plus the int32 bias, then requantized by a
 * fixed-point multiplier M0 in [2^30, 2^31) and a rounding right shift, exactly as
 * efficientml.quant.integer_ops.rounding_shift computes it in int64 (round half toward +inf; shifts
 * of 64 or more give the sign, as PyTorch's int64 shifts do). This file is pasted into every
 * generated model, so each model's .c is self-contained: no malloc, no libc beyond memcpy/memset.
 */
#include <stdint.h>
#include <string.h>

static int64_t eml_rshift_round(int64_t prod, int32_t shift) {
    if (shift <= 0) return (int64_t)((uint64_t)prod << (-shift));
    if (shift < 63) return (prod + ((int64_t)1 << (shift - 1))) >> shift;
    /* PyTorch semantics for huge shifts (multipliers below 2^-32, e.g. all-zero channels) */
    int64_t half = shift - 1 >= 64 ? 0 : (int64_t)((uint64_t)1 << (shift - 1));
    int64_t sum = (int64_t)((uint64_t)prod + (uint64_t)half);
    if (shift >= 64) return sum < 0 ? -1 : 0;
    return sum >> shift;
}

/* round(acc * m0 / 2^shift) + zout, clamped to [lo, hi] */
static uint8_t eml_requant(int64_t acc, int32_t m0, int32_t shift, int32_t zout, int32_t lo, int32_t hi) {
    int64_t prod = (int64_t)((uint64_t)acc * (uint64_t)(int64_t)m0);
    int64_t y = eml_rshift_round(prod, shift) + zout;
    if (y < lo) y = lo;
    if (y > hi) y = hi;
    return (uint8_t)y;
}

typedef struct {
    int32_t c, h, w;          /* input channels, height, width */
    int32_t o, kh, kw;        /* output channels, kernel */
    int32_t sh, sw, ph, pw, dh, dw, groups;
    int32_t ho, wo;           /* output height, width */
    int32_t zin, zout, lo, hi;
} eml_conv_t;

/* any conv2d: y (o, ho, wo) from x (c, h, w), w (o, c/groups, kh, kw); padded taps are the real zero */
static void eml_conv2d(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int32_t *bias,
                       const int32_t *m0, const int8_t *shift, uint8_t *y) {
    int32_t cg = p->c / p->groups, og = p->o / p->groups;
    for (int32_t o = 0; o < p->o; o++) {
        const uint8_t *xg = x + (int64_t)(o / og) * cg * p->h * p->w;
        const int8_t *wo_ = w + (int64_t)o * cg * p->kh * p->kw;
        for (int32_t oy = 0; oy < p->ho; oy++) {
            for (int32_t ox = 0; ox < p->wo; ox++) {
                int32_t acc = 0;
                for (int32_t ci = 0; ci < cg; ci++) {
                    const uint8_t *xc = xg + (int64_t)ci * p->h * p->w;
                    const int8_t *wc = wo_ + ci * p->kh * p->kw;
                    for (int32_t ky = 0; ky < p->kh; ky++) {
                        int32_t iy = oy * p->sh - p->ph + ky * p->dh;
                        if (iy < 0 || iy >= p->h) continue;
                        for (int32_t kx = 0; kx < p->kw; kx++) {
                            int32_t ix = ox * p->sw - p->pw + kx * p->dw;
                            if (ix < 0 || ix >= p->w) continue;
                            acc += ((int32_t)xc[iy * p->w + ix] - p->zin) * wc[ky * p->kw + kx];
                        }
                    }
                }
                y[((int64_t)o * p->ho + oy) * p->wo + ox] =
                    eml_requant((int64_t)acc + bias[o], m0[o], shift[o], p->zout, p->lo, p->hi);
            }
        }
    }
}

/* 1x1, stride 1, no padding, groups 1: per pixel, a dot product over the channels */
static void eml_pointwise(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int32_t *bias,
                          const int32_t *m0, const int8_t *shift, uint8_t *y) {
    int32_t hw = p->h * p->w;
    for (int32_t o = 0; o < p->o; o++) {
        const int8_t *wr = w + (int64_t)o * p->c;
        for (int32_t i = 0; i < hw; i++) {
            int32_t acc = 0;
            for (int32_t c = 0; c < p->c; c++) acc += ((int32_t)x[(int64_t)c * hw + i] - p->zin) * wr[c];
            y[(int64_t)o * hw + i] = eml_requant((int64_t)acc + bias[o], m0[o], shift[o], p->zout, p->lo, p->hi);
        }
    }
}

/* depthwise (groups == c == o). With scratch != NULL it runs in place (y == x): channel k is computed
 * into scratch (ho*wo bytes) and copied to y + k*ho*wo, which only covers input channels <= k since
 * ho*wo <= h*w (the planner checks it) */
static void eml_depthwise(const eml_conv_t *p, const uint8_t *x, const int8_t *w, const int32_t *bias,
                          const int32_t *m0, const int8_t *shift, uint8_t *y, uint8_t *scratch) {
    int32_t plane = p->ho * p->wo;
    for (int32_t k = 0; k < p->c; k++) {
        const uint8_t *xc = x + (int64_t)k * p->h * p->w;
        const int8_t *wk = w + k * p->kh * p->kw;
        uint8_t *dst = scratch ? scratch : y + (int64_t)k * plane;
        for (int32_t oy = 0; oy < p->ho; oy++) {
            for (int32_t ox = 0; ox < p->wo; ox++) {
                int32_t acc = 0;
                for (int32_t ky = 0; ky < p->kh; ky++) {
                    int32_t iy = oy * p->sh - p->ph + ky * p->dh;
                    if (iy < 0 || iy >= p->h) continue;
                    for (int32_t kx = 0; kx < p->kw; kx++) {
                        int32_t ix = ox * p->sw - p->pw + kx * p->dw;
                        if (ix < 0 || ix >= p->w) continue;
                        acc += ((int32_t)xc[iy * p->w + ix] - p->zin) * wk[ky * p->kw + kx];
                    }
                }
                dst[oy * p->wo + ox] = eml_requant((int64_t)acc + bias[k], m0[k], shift[k], p->zout, p->lo, p->hi);
            }
        }
        if (scratch) memcpy(y + (int64_t)k * plane, scratch, (size_t)plane);
    }
}

/* y (rows, o) = requant(x (rows, f) . w^T (o, f) + bias): raw codes times weights, zin folded into bias
 * by the caller's b_eff = b_q - zin * sum(w) (int64, as the Python reference) */
static void eml_linear(int32_t rows, int32_t f, int32_t o, const uint8_t *x, const int8_t *w,
                       const int64_t *beff, const int32_t *m0, const int8_t *shift,
                       int32_t zout, int32_t lo, int32_t hi, uint8_t *y) {
    for (int32_t r = 0; r < rows; r++) {
        for (int32_t j = 0; j < o; j++) {
            int32_t acc = 0;
            const int8_t *wr = w + (int64_t)j * f;
            for (int32_t i = 0; i < f; i++) acc += (int32_t)x[(int64_t)r * f + i] * wr[i];
            y[(int64_t)r * o + j] = eml_requant((int64_t)acc + beff[j], m0[j], shift[j], zout, lo, hi);
        }
    }
}

typedef struct {
    int32_t c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo;
} eml_pool_t;

/* max-pool; padded taps are skipped (PyTorch pads with -inf) */
static void eml_maxpool(const eml_pool_t *p, const uint8_t *x, uint8_t *y) {
    for (int32_t k = 0; k < p->c; k++) {
        const uint8_t *xc = x + (int64_t)k * p->h * p->w;
        for (int32_t oy = 0; oy < p->ho; oy++) {
            for (int32_t ox = 0; ox < p->wo; ox++) {
                int32_t best = -1;
                for (int32_t ky = 0; ky < p->kh; ky++) {
                    int32_t iy = oy * p->sh - p->ph + ky * p->dh;
                    if (iy < 0 || iy >= p->h) continue;
                    for (int32_t kx = 0; kx < p->kw; kx++) {
                        int32_t ix = ox * p->sw - p->pw + kx * p->dw;
                        if (ix < 0 || ix >= p->w) continue;
                        if (xc[iy * p->w + ix] > best) best = xc[iy * p->w + ix];
                    }
                }
                y[((int64_t)k * p->ho + oy) * p->wo + ox] = (uint8_t)(best < 0 ? 0 : best);
            }
        }
    }
}

/* mean over the middle axis of (outer, n, inner): sum(q - zin) requantized by S_in / (n S_out) */
static void eml_mean(int32_t outer, int32_t n, int32_t inner, const uint8_t *x, int32_t zin, int32_t m0,
                     int32_t shift, int32_t zout, int32_t lo, int32_t hi, uint8_t *y) {
    for (int32_t a = 0; a < outer; a++) {
        for (int32_t b = 0; b < inner; b++) {
            int64_t s = 0;
            for (int32_t i = 0; i < n; i++) s += (int32_t)x[((int64_t)a * n + i) * inner + b] - zin;
            y[(int64_t)a * inner + b] = eml_requant(s, m0, shift, zout, lo, hi);
        }
    }
}

/* y = clamp(((a - za) ma + (b - zb) mb) >> shift (rounded) + zout, lo, hi); y may alias a or b */
static void eml_add(int32_t n, const uint8_t *a, const uint8_t *b, int32_t za, int32_t zb, int64_t ma,
                    int64_t mb, int32_t shift, int32_t zout, int32_t lo, int32_t hi, uint8_t *y) {
    for (int32_t i = 0; i < n; i++) {
        int64_t acc = ((int64_t)a[i] - za) * ma + ((int64_t)b[i] - zb) * mb;
        y[i] = eml_requant(acc, 1, shift, zout, lo, hi);
    }
}

/* elementwise product with b broadcast: b's index is i's coordinates taken modulo b's shape
 * (bstride[d] == 0 where b has size 1); y may alias a */
static void eml_mul(int32_t n, const int32_t *shape, const int32_t *bstride, const uint8_t *a,
                    const uint8_t *b, int32_t za, int32_t zb, int32_t m0, int32_t shift, int32_t zout,
                    int32_t lo, int32_t hi, uint8_t *y) {
    for (int32_t i = 0; i < n; i++) {
        int32_t rem = i, bi = 0;
        for (int32_t d = 3; d >= 0; d--) {
            bi += (rem % shape[d]) * bstride[d];
            rem /= shape[d];
        }
        int64_t prod = ((int64_t)a[i] - za) * ((int64_t)b[bi] - zb);
        y[i] = eml_requant(prod, m0, shift, zout, lo, hi);
    }
}

static void eml_clamp(int32_t n, const uint8_t *x, int32_t lo, int32_t hi, uint8_t *y) {
    for (int32_t i = 0; i < n; i++) y[i] = x[i] < lo ? (uint8_t)lo : x[i] > hi ? (uint8_t)hi : x[i];
}

static void eml_lut(int32_t n, const uint8_t *x, const uint8_t *table, uint8_t *y) {
    for (int32_t i = 0; i < n; i++) y[i] = table[x[i]];
}

/* y[i] = x[idx[i]], or the fill code where idx[i] < 0 (padding) */
static void eml_gather(int32_t n, const uint8_t *x, const int32_t *idx, uint8_t fill, uint8_t *y) {
    for (int32_t i = 0; i < n; i++) y[i] = idx[i] < 0 ? fill : x[idx[i]];
}

/* one input of a concatenation: `outer` blocks of `block` codes, written every `ystride` codes,
 * requantized to the output grid (m0 == 0: already on it, a copy) */
static void eml_cat_part(int32_t outer, int32_t block, int32_t ystride, const uint8_t *x, int32_t zin,
                         int32_t m0, int32_t shift, int32_t zout, int32_t lo, int32_t hi, uint8_t *y) {
    for (int32_t a = 0; a < outer; a++) {
        const uint8_t *src = x + (int64_t)a * block;
        uint8_t *dst = y + (int64_t)a * ystride;
        if (m0 == 0) { memcpy(dst, src, (size_t)block); continue; }
        for (int32_t i = 0; i < block; i++) dst[i] = eml_requant((int64_t)src[i] - zin, m0, shift, zout, lo, hi);
    }
}
