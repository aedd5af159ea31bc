/* One batch-1 decode step of a LLaMA-family decoder, driven from C: embedding row → for every block
 * RMSNorm → q/k/v → (q/k RMSNorm) → RoPE → write k, v into the KV cache in place → attention over the
 * cached keys → o_proj → residual → RMSNorm → gate/up → SiLU·mul → down → residual; then the final
 * norm and the output projection into the logits. No Python, no torch op per layer: at ~300 tokens/s
 * a step has 3 ms, and ~450 eager ops cost most of that (issue #17).
 *
 * The matrix products call the project's own kernels through function pointers the caller passes
 * (fns[0] efficientml_gemv_f32, fns[1] efficientml_gemv_h16, fns[2] efficientml_qgemv: the same
 * compiled libraries the per-module path runs, so both paths compute the same products). Every
 * other step (norms, RoPE, attention, activations, residuals) runs here in fp32, whatever the
 * weights' dtype; the cache keeps its own dtype (fp32, bf16 or fp16, written with round to nearest
 * even as torch casts).
 *
 * Layout (all row-major, contiguous): the cache is (layers, 1, n_kv, max_len, hd); rope tables are
 * (max_len, rope_dim) cos and sin in Hugging Face's rotate-half form with any scaling folded in; a
 * linear's weight is (out, in). Attention heads are split over OpenMP threads. */
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
enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
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
    int32_t n_layers, d, n_heads, n_kv, hd, ffn, rope_dim, act, cache_dtype, embed_dtype, isa, f16_ok;
    int64_t vocab, max_len, window;  /* window 0: no sliding window */
    float eps, attn_scale, resid_mult, emb_mult, logit_scale;
    const void *embed;               /* (vocab, d) in embed_dtype */
    const float *final_norm;
    const float *cos, *sin;          /* (max_len, rope_dim); NULL: no RoPE */
    void *kcache, *vcache;
    const em_layer *layers;
    em_linear head;
    void *fns[3];
    float *work;                     /* efficientml_decode_work_floats() floats */
} em_model;

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
static inline float f16_to_f32(uint16_t h) { (void)h; return NAN; }   /* refused at build: f16_ok = 0 */
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

static int linear(const em_model *m, const em_linear *l, const float *x, float *y, int nthreads) {
    switch (l->kind) {
    case LIN_F32:
        ((gemv_f32_fn)m->fns[0])((const float *)l->w, x, l->bias, y, 1, l->out, l->in, nthreads);
        return 0;
    case LIN_BF16:
    case LIN_F16:
        return ((gemv_h16_fn)m->fns[1])((const uint16_t *)l->w, x, l->bias, y, 1, l->out, l->in, nthreads,
                                        l->kind == LIN_F16);
    case LIN_Q:
        return ((qgemv_fn)m->fns[2])((const uint8_t *)l->w, l->d, l->m, l->bits, x, l->bias, y, 1, l->out, l->in,
                                     nthreads, m->isa);
    default:
        return 0;  /* LIN_NONE: computed with the packed linear before it */
    }
}

/* Linears that read the same x and write consecutive ranges of y (q|k|v, gate|up). */
static int linears(const em_model *m, const em_linear *ls, int n, const float *x, float *y, int nthreads) {
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

/* softmax(scale · q·K[start..pos]) · V[start..pos] for every query head; K, V of this layer. */
static void attention(const em_model *m, const float *q, const void *K, const void *V, int64_t start,
                      int64_t pos, float *out, float *scores, int nthreads) {
    const int hd = m->hd, g = m->n_heads / m->n_kv, dt = m->cache_dtype;
    const int64_t S = pos - start + 1;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int h = 0; h < m->n_heads; h++) {
        const int64_t kv0 = (int64_t)(h / g) * m->max_len * hd;
        const float *qh = q + (int64_t)h * hd;
        float *sc = scores + (int64_t)h * m->max_len, mx = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            const int64_t base = kv0 + (start + j) * hd;
            float dot = 0.f;
            if (dt == DT_F32) {
                const float *kr = (const float *)K + base;
                for (int i = 0; i < hd; i++) dot += qh[i] * kr[i];
            } else {
                for (int i = 0; i < hd; i++) dot += qh[i] * load_dt(K, base + i, dt);
            }
            sc[j] = dot * m->attn_scale;
            mx = sc[j] > mx ? sc[j] : mx;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < S; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
        float *oh = out + (int64_t)h * hd;
        for (int i = 0; i < hd; i++) oh[i] = 0.f;
        for (int64_t j = 0; j < S; j++) {
            const float p = sc[j] / sum;
            const int64_t base = kv0 + (start + j) * hd;
            if (dt == DT_F32) {
                const float *vr = (const float *)V + base;
                for (int i = 0; i < hd; i++) oh[i] += p * vr[i];
            } else {
                for (int i = 0; i < hd; i++) oh[i] += p * load_dt(V, base + i, dt);
            }
        }
    }
}

static size_t elsize(int dt) { return dt == DT_F32 ? 4 : 2; }

/* The work floats a model needs: x, xn, tmp (d each), qkv, attn out, gate|up, act, scores. */
int64_t efficientml_decode_work_floats(const em_model *m) {
    const int64_t qkv = (int64_t)(m->n_heads + 2 * m->n_kv) * m->hd, att = (int64_t)m->n_heads * m->hd;
    return 3 * (int64_t)m->d + qkv + att + 3 * (int64_t)m->ffn + (int64_t)m->n_heads * m->max_len + 64;
}

static int block(const em_model *m, int li, float *x, int64_t pos, int nthreads) {
    const em_layer *L = &m->layers[li];
    const int d = m->d, hd = m->hd, nq = m->n_heads * hd, nk = m->n_kv * hd;
    float *xn = x + d, *tmp = xn + d, *qkv = tmp + d, *att = qkv + nq + 2 * nk, *gu = att + nq;
    float *a = gu + 2 * m->ffn, *scores = a + m->ffn;
    rmsnorm(x, L->attn_norm, d, m->eps, xn);
    if (linears(m, L->qkv, 3, xn, qkv, nthreads)) return -1;
    float *q = qkv, *k = qkv + nq, *v = k + nk;
    for (int h = 0; h < m->n_heads; h++) {
        if (L->q_norm) rmsnorm(q + h * hd, L->q_norm, hd, m->eps, q + h * hd);
        if (m->cos) rope(q + h * hd, m->cos + pos * m->rope_dim, m->sin + pos * m->rope_dim, m->rope_dim);
    }
    const size_t layer_elems = (size_t)m->n_kv * (size_t)m->max_len * (size_t)hd;
    char *K = (char *)m->kcache + (size_t)li * layer_elems * elsize(m->cache_dtype);
    char *V = (char *)m->vcache + (size_t)li * layer_elems * elsize(m->cache_dtype);
    for (int h = 0; h < m->n_kv; h++) {
        if (L->k_norm) rmsnorm(k + h * hd, L->k_norm, hd, m->eps, k + h * hd);
        if (m->cos) rope(k + h * hd, m->cos + pos * m->rope_dim, m->sin + pos * m->rope_dim, m->rope_dim);
        const int64_t base = ((int64_t)h * m->max_len + pos) * hd;
        for (int i = 0; i < hd; i++) {
            store_dt(K, base + i, m->cache_dtype, k[h * hd + i]);
            store_dt(V, base + i, m->cache_dtype, v[h * hd + i]);
        }
    }
    const int64_t start = m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0;
    attention(m, q, K, V, start, pos, att, scores, nthreads);
    if (linear(m, &L->o, att, tmp, nthreads)) return -1;
    for (int i = 0; i < d; i++) x[i] += m->resid_mult * tmp[i];
    rmsnorm(x, L->mlp_norm, d, m->eps, xn);
    if (linears(m, L->gu, 2, xn, gu, nthreads)) return -1;
    for (int i = 0; i < m->ffn; i++) a[i] = act(gu[i], m->act) * gu[m->ffn + i];
    if (linear(m, &L->down, a, tmp, nthreads)) return -1;
    for (int i = 0; i < d; i++) x[i] += m->resid_mult * tmp[i];
    return 0;
}

/* Token `token` at position `pos` (< max_len): writes vocab logits. Returns 0; −1 when a kernel failed
 * (its workspace could not be allocated, or fp16 without compiler support); −2 for a bad token/pos. */
int efficientml_decode_step(const em_model *m, int64_t token, int64_t pos, float *logits, int nthreads) {
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->max_len) return -2;
    float *x = m->work;
    for (int i = 0; i < m->d; i++) x[i] = load_dt(m->embed, token * m->d + i, m->embed_dtype) * m->emb_mult;
    for (int li = 0; li < m->n_layers; li++)
        if (block(m, li, x, pos, nthreads)) return -1;
    float *xn = x + m->d;
    rmsnorm(x, m->final_norm, m->d, m->eps, xn);
    if (linear(m, &m->head, xn, logits, nthreads)) return -1;
    if (m->logit_scale != 1.0f)
        for (int64_t i = 0; i < m->vocab; i++) logits[i] /= m->logit_scale;
    return 0;
}
