/* What the decode steps share (decode_llama.c: batch 1 on a contiguous cache; decode_paged.c: ragged
 * rows over the serving engine's block pool): the model descriptor the Python side fills, the 16-bit
 * and quantized-cache conversions, the cache quantizer, key dot products and value sums over one cache
 * row, the linears through the project's kernels, RMSNorm, RoPE and the activations.
 *
 * A cache row is one kv head's key or value (hd numbers, or codes with per-group fp16 scales and
 * zeros); layer_view gives a layer's rows, n_kv · max_len of them (max_len: positions of a contiguous
 * cache, slots of a block pool). */
#ifndef EFFICIENTML_DECODE_COMMON_H
#define EFFICIENTML_DECODE_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef void (*gemv_f32_fn)(const float *, const float *, const float *, float *, int64_t, int64_t,
                            int64_t, int);
typedef int (*gemv_h16_fn)(const uint16_t *, const float *, const float *, float *, int64_t, int64_t,
                           int64_t, int, int);
typedef int (*qgemv_fn)(const uint8_t *, const float *, const float *, int, const float *, const float *,
                        float *, int64_t, int64_t, int64_t, int, int);

enum { LIN_NONE = -1, LIN_F32 = 0, LIN_BF16 = 1, LIN_F16 = 2, LIN_Q = 3 };
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_Q8 = 3, DT_Q4 = 4 };  /* cache: DT_Q* codes */
enum { ACT_SILU = 0, ACT_GELU = 1, ACT_GELU_TANH = 2 };

typedef struct {
    int32_t kind, bits;          /* LIN_*; bits for LIN_Q (4 or 8) */
    int64_t out, in;
    const void *w;               /* (out, in) floats / 16-bit, or the codes qs */
    const float *d, *m, *bias;   /* LIN_Q block scales and offsets (m may be NULL); bias (out) or NULL */
} em_linear;

typedef struct {
    const float *attn_norm, *mlp_norm, *q_norm, *k_norm;  /* fp32; q/k norms (hd) or NULL */
    em_linear qkv[3], o, gu[2], down;  /* qkv[1..2] / gu[1] LIN_NONE when packed in the first */
} em_layer;

typedef struct {
    int32_t n_layers, d, n_heads, n_kv, hd, ffn, rope_dim, act, cache_dtype, embed_dtype, isa;
    int64_t vocab, max_len, window;  /* window 0: no sliding window */
    float eps, attn_scale, resid_mult, emb_mult, logit_scale;
    const void *embed;               /* (vocab, d) in embed_dtype */
    const float *final_norm;
    const float *cos, *sin;          /* (max_len, rope_dim); NULL: no RoPE */
    void *kcache, *vcache;           /* floats in cache_dtype, or the codes */
    const em_layer *layers;
    em_linear head;
    void *fns[3];
    float *work;                     /* efficientml_decode_work_floats() floats */
    int64_t kv_g;                    /* DT_Q*: head dimensions per scale */
    uint16_t *kscale, *vscale, *kzero, *vzero;  /* DT_Q*: fp16 scales; DT_Q4: fp16 zeros */
} em_model;

typedef struct { void *c; uint16_t *s, *z; } kv_view;  /* one layer's keys or values */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__FLT16_MAX__)
static inline float f16_to_f32(uint16_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
static inline uint16_t f32_to_f16(float x) { _Float16 f = (_Float16)x; uint16_t h; memcpy(&h, &f, 2); return h; }
#else
static inline float f16_to_f32(uint16_t h) { (void)h; return NAN; }   /* never reached: native_step refuses fp16 without _Float16 */
static inline uint16_t f32_to_f16(float x) { (void)x; return 0x7e00; }
#endif

static inline float load_dt(const void *p, int64_t i, int dt) {
    if (dt == DT_F32) return ((const float *)p)[i];
    const uint16_t h = ((const uint16_t *)p)[i];
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static inline void store_dt(void *p, int64_t i, int dt, float x) {
    if (dt == DT_F32) ((float *)p)[i] = x;
    else ((uint16_t *)p)[i] = dt == DT_BF16 ? f32_to_bf16(x) : f32_to_f16(x);
}

/* fp16 <-> fp32 in software, round to nearest even as torch's .half() (the quantized cache's scales and
 * zeros; independent of the compiler's _Float16). */
static inline uint16_t h16_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u) return sign | 0x7e00u;              /* NaN */
    if (u >= 0x477ff000u) return sign | 0x7c00u;             /* rounds past 65504: inf */
    if (u < 0x38800000u) {                                   /* below 2^-14: a subnormal (or 0) */
        float a;
        memcpy(&a, &u, 4);
        return sign | (uint16_t)rintf(a * 16777216.0f);      /* units of 2^-24, exact scaling */
    }
    u += 0xfffu + ((u >> 13) & 1u);
    return sign | (uint16_t)((u - 0x38000000u) >> 13);
}

static inline float f32_from_h16(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
    uint32_t u;
    if (e == 0) {
        const float a = (float)mant * 5.9604644775390625e-8f;  /* 2^-24 */
        memcpy(&u, &a, 4);
        u |= sign;
    } else {
        u = sign | (e == 31 ? 0x7f800000u | (mant << 13) : ((e + 112u) << 23) | (mant << 13));
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float clamp_code(float r, float hi, float lo) {  /* NaN: lo (what torch's cast gives) */
    return r >= lo ? (r <= hi ? r : hi) : lo;
}

/* Quantize rows (n, hd) of fp32 into the cache's codes, fp16 scales and (int4) fp16 zeros per group of g,
 * exactly as QuantizedKVCache._quantize (efficientml.quant.grid for int8). bits 8: int8 codes (n, hd);
 * bits 4: bytes (n, hd/2). */
void efficientml_kv_quantize(const float *x, int64_t n, int64_t hd, int bits, int64_t g, void *codes,
                             uint16_t *scales, uint16_t *zeros) {
    const int64_t ng = hd / g;
    for (int64_t r = 0; r < n; r++) {
        const float *xr = x + r * hd;
        for (int64_t j = 0; j < ng; j++) {
            const float *xg = xr + j * g;
            float lo = xg[0], hi = xg[0];
            for (int64_t i = 1; i < g; i++) { lo = xg[i] < lo ? xg[i] : lo; hi = xg[i] > hi ? xg[i] : hi; }
            if (bits == 8) {  /* range widened to include 0, absmax onto 127, floor 1e-5, then fp16 */
                const float amax = fmaxf(fmaxf(hi, 0.0f), -fminf(lo, 0.0f));
                const float s = f32_from_h16(scales[r * ng + j] = h16_from_f32(fmaxf(amax / 127.0f, 1e-5f)));
                int8_t *c = (int8_t *)codes + r * hd + j * g;
                for (int64_t i = 0; i < g; i++) c[i] = (int8_t)clamp_code(rintf(xg[i] / s), 127.0f, -127.0f);
            } else {          /* measured range onto [0, 15], floor 1e-8, fp16 scale and fp16 zero = min */
                const float s = f32_from_h16(scales[r * ng + j] = h16_from_f32(fmaxf((hi - lo) / 15.0f, 1e-8f)));
                const float z = f32_from_h16(zeros[r * ng + j] = h16_from_f32(lo));
                uint8_t *c = (uint8_t *)codes + (r * hd + j * g) / 2;
                for (int64_t i = 0; i < g; i += 2) {
                    const uint8_t a = (uint8_t)clamp_code(rintf((xg[i] - z) / s), 15.0f, 0.0f);
                    const uint8_t b = (uint8_t)clamp_code(rintf((xg[i + 1] - z) / s), 15.0f, 0.0f);
                    c[i / 2] = (uint8_t)(a | (b << 4));
                }
            }
        }
    }
}

/* Dot products over a key row in 8 fp32 lanes (the strict-FP build does not vectorize a reduction by
 * itself): fp32, or bf16 bits widened by a shift. */
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint16_t v8u16_u __attribute__((vector_size(16), aligned(2), may_alias));
typedef uint32_t v8u32 __attribute__((vector_size(32)));

static inline float hsum8(v8f v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

static inline float dot_f32(const float *q, const float *k, int64_t n) {
    v8f acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += *(const v8f_u *)(q + i) * *(const v8f_u *)(k + i);
    float s = hsum8(acc);
    for (; i < n; i++) s += q[i] * k[i];
    return s;
}

static inline float dot_bf16(const float *q, const uint16_t *k, int64_t n) {
    v8f acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        acc += *(const v8f_u *)(q + i) * (v8f)(__builtin_convertvector(*(const v8u16_u *)(k + i), v8u32) << 16);
    float s = hsum8(acc);
    for (; i < n; i++) s += q[i] * bf16_to_f32(k[i]);
    return s;
}

/* q · row r of a layer's keys (r = kv head · max_len + position), dequantizing codes group by group. */
static inline float key_dot(const em_model *m, const kv_view *K, int64_t r, const float *q) {
    const int64_t hd = m->hd, g = m->kv_g;
    float dot = 0.f;
    if (m->cache_dtype == DT_F32) {
        dot = dot_f32(q, (const float *)K->c + r * hd, hd);
    } else if (m->cache_dtype == DT_BF16) {
        dot = dot_bf16(q, (const uint16_t *)K->c + r * hd, hd);
    } else if (m->cache_dtype == DT_Q8) {
        const int8_t *c = (const int8_t *)K->c + r * hd;
        for (int64_t j = 0; j < hd / g; j++) {
            float acc = 0.f;
            for (int64_t i = j * g; i < (j + 1) * g; i++) acc += q[i] * (float)c[i];
            dot += acc * f32_from_h16(K->s[r * (hd / g) + j]);
        }
    } else if (m->cache_dtype == DT_Q4) {
        const uint8_t *c = (const uint8_t *)K->c + r * (hd / 2);
        for (int64_t j = 0; j < hd / g; j++) {
            float acc = 0.f, qs = 0.f;
            for (int64_t i = j * g; i < (j + 1) * g; i += 2) {
                const uint8_t b = c[i / 2];
                acc += q[i] * (float)(b & 15) + q[i + 1] * (float)(b >> 4);
                qs += q[i] + q[i + 1];
            }
            dot += acc * f32_from_h16(K->s[r * (hd / g) + j]) + qs * f32_from_h16(K->z[r * (hd / g) + j]);
        }
    } else {
        for (int64_t i = 0; i < hd; i++) dot += q[i] * load_dt(K->c, r * hd + i, m->cache_dtype);
    }
    return dot;
}

/* o += p · row r of a layer's values. */
static inline void value_acc(const em_model *m, const kv_view *V, int64_t r, float p, float *o) {
    const int64_t hd = m->hd, g = m->kv_g;
    if (m->cache_dtype == DT_F32) {
        const float *vr = (const float *)V->c + r * hd;
        for (int64_t i = 0; i < hd; i++) o[i] += p * vr[i];
    } else if (m->cache_dtype == DT_BF16) {  /* 8 lanes, bf16 bits widened by a shift */
        const uint16_t *vr = (const uint16_t *)V->c + r * hd;
        int64_t i = 0;
        for (; i + 8 <= hd; i += 8)
            *(v8f_u *)(o + i) += p * (v8f)(__builtin_convertvector(*(const v8u16_u *)(vr + i), v8u32) << 16);
        for (; i < hd; i++) o[i] += p * bf16_to_f32(vr[i]);
    } else if (m->cache_dtype == DT_Q8) {
        const int8_t *c = (const int8_t *)V->c + r * hd;
        for (int64_t j = 0; j < hd / g; j++) {
            const float ps = p * f32_from_h16(V->s[r * (hd / g) + j]);
            for (int64_t i = j * g; i < (j + 1) * g; i++) o[i] += ps * (float)c[i];
        }
    } else if (m->cache_dtype == DT_Q4) {
        const uint8_t *c = (const uint8_t *)V->c + r * (hd / 2);
        for (int64_t j = 0; j < hd / g; j++) {
            const float ps = p * f32_from_h16(V->s[r * (hd / g) + j]), pz = p * f32_from_h16(V->z[r * (hd / g) + j]);
            for (int64_t i = j * g; i < (j + 1) * g; i += 2) {
                const uint8_t b = c[i / 2];
                o[i] += ps * (float)(b & 15) + pz;
                o[i + 1] += ps * (float)(b >> 4) + pz;
            }
        }
    } else {
        for (int64_t i = 0; i < hd; i++) o[i] += p * load_dt(V->c, r * hd + i, m->cache_dtype);
    }
}

/* y (M, out) = x (M, in) · W^T (+ bias) on the linear's kernel. */
static int linear_rows(const em_model *m, const em_linear *l, const float *x, int64_t M, float *y, int nthreads) {
    switch (l->kind) {
    case LIN_F32:
        ((gemv_f32_fn)m->fns[0])((const float *)l->w, x, l->bias, y, M, l->out, l->in, nthreads);
        return 0;
    case LIN_BF16:
    case LIN_F16:
        return ((gemv_h16_fn)m->fns[1])((const uint16_t *)l->w, x, l->bias, y, M, l->out, l->in, nthreads,
                                        l->kind == LIN_F16);
    case LIN_Q:
        return ((qgemv_fn)m->fns[2])((const uint8_t *)l->w, l->d, l->m, l->bits, x, l->bias, y, M, l->out, l->in,
                                     nthreads, m->isa);
    default:
        return 0;  /* LIN_NONE: computed with the packed linear before it */
    }
}

static inline int linear(const em_model *m, const em_linear *l, const float *x, float *y, int nthreads) {
    return linear_rows(m, l, x, 1, y, nthreads);
}

/* Linears that read the same x and write consecutive ranges of y (q|k|v, gate|up). */
static inline int linears(const em_model *m, const em_linear *ls, int n, const float *x, float *y, int nthreads) {
    for (int i = 0; i < n; i++) {
        if (ls[i].kind == LIN_NONE) continue;
        if (linear(m, &ls[i], x, y, nthreads)) return -1;
        y += ls[i].out;
        for (int j = i + 1; j < n && ls[j].kind == LIN_NONE; j++) y += ls[j].out;  /* packed: i wrote them */
    }
    return 0;
}

static void rmsnorm(const float *x, const float *w, int64_t n, float eps, float *y) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / (double)n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* Rotate-half RoPE on the first r of hd dimensions of one head, in place. */
static void rope(float *v, const float *c, const float *s, int r) {
    const int h = r / 2;
    for (int i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * c[i] - b * s[i];
        v[i + h] = b * c[i + h] + a * s[i + h];
    }
}

static inline float act(float g, int kind) {
    if (kind == ACT_SILU) return g / (1.0f + expf(-g));
    if (kind == ACT_GELU) return 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
    const float k = 0.7978845608028654f;  /* sqrt(2/pi) */
    return 0.5f * g * (1.0f + tanhf(k * (g + 0.044715f * g * g * g)));
}


/* Layer li's keys (kind 0) or values (kind 1) in the cache. */
static kv_view layer_view(const em_model *m, int li, int kind) {
    const int64_t rows = (int64_t)m->n_kv * m->max_len, hd = m->hd, dt = m->cache_dtype;
    const int64_t row_bytes = dt == DT_Q8 ? hd : dt == DT_Q4 ? hd / 2 : hd * (dt == DT_F32 ? 4 : 2);
    kv_view v = {(char *)(kind ? m->vcache : m->kcache) + (size_t)li * rows * row_bytes, NULL, NULL};
    if (dt == DT_Q8 || dt == DT_Q4) {
        const int64_t per_layer = rows * (hd / m->kv_g);
        v.s = (kind ? m->vscale : m->kscale) + li * per_layer;
        if (dt == DT_Q4) v.z = (kind ? m->vzero : m->kzero) + li * per_layer;
    }
    return v;
}

/* Write one kv head's new key or value x (hd) at row r of the layer's cache. */
static void store_row(const em_model *m, const kv_view *c, int64_t r, const float *x) {
    const int64_t hd = m->hd, ng = hd / m->kv_g;
    if (m->cache_dtype == DT_Q8)
        efficientml_kv_quantize(x, 1, hd, 8, m->kv_g, (int8_t *)c->c + r * hd, c->s + r * ng, NULL);
    else if (m->cache_dtype == DT_Q4)
        efficientml_kv_quantize(x, 1, hd, 4, m->kv_g, (uint8_t *)c->c + r * hd / 2, c->s + r * ng, c->z + r * ng);
    else
        for (int64_t i = 0; i < hd; i++) store_dt(c->c, r * hd + i, m->cache_dtype, x[i]);
}

#endif
