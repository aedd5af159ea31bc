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
 * The cache may also be int8 or int4 codes (QuantizedKVCache): the new k/v of each layer is quantized
 * here with exactly the rounding of the Python quantizer (efficientml_kv_quantize: int8 symmetric
 * narrow [-127, 127], scale = absmax/127 floored at 1e-5, then rounded to fp16; int4 asymmetric,
 * scale = (max - min)/15 floored at 1e-8 and zero = min, both rounded to fp16, codes
 * round-half-even((x - zero)/scale) clamped to [0, 15], two per byte, low nibble first) and
 * attention reads the codes, dequantizing each group on the fly (no float copy of the cache).
 *
 * Layout (all row-major, contiguous): the cache is (layers, 1, n_kv, max_len, hd); rope tables are
 * (max_len, rope_dim) cos and sin in Hugging Face's rotate-half form with any scaling folded in; a
 * linear's weight is (out, in); quantized: codes (layers, 1, n_kv, max_len, hd or hd/2) and fp16 scales
 * (and int4 zeros) (layers, 1, n_kv, max_len, hd/g). Attention heads are split over OpenMP threads. */
#include "decode_common.h"

/* softmax(scale · q·K[start..pos]) · V[start..pos] for every query head; K, V of this layer. */
static void attention(const em_model *m, const float *q, const kv_view *K, const kv_view *V, int64_t start,
                      int64_t pos, float *out, float *scores, int nthreads) {
    const int hd = m->hd, g = m->n_heads / m->n_kv;
    const int64_t S = pos - start + 1;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int h = 0; h < m->n_heads; h++) {
        const int64_t r0 = (int64_t)(h / g) * m->max_len + start;  /* this head's kv rows */
        const float *qh = q + (int64_t)h * hd;
        float *sc = scores + (int64_t)h * m->max_len, mx = -INFINITY;
        for (int64_t j = 0; j < S; j++) {
            sc[j] = key_dot(m, K, r0 + j, qh) * m->attn_scale;
            mx = sc[j] > mx ? sc[j] : mx;
        }
        float sum = 0.f;
        for (int64_t j = 0; j < S; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
        float *oh = out + (int64_t)h * hd;
        for (int i = 0; i < hd; i++) oh[i] = 0.f;
        for (int64_t j = 0; j < S; j++) value_acc(m, V, r0 + j, sc[j] / sum, oh);
    }
}


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
    const kv_view K = layer_view(m, li, 0), V = layer_view(m, li, 1);
    for (int h = 0; h < m->n_kv; h++) {
        if (L->k_norm) rmsnorm(k + h * hd, L->k_norm, hd, m->eps, k + h * hd);
        if (m->cos) rope(k + h * hd, m->cos + pos * m->rope_dim, m->sin + pos * m->rope_dim, m->rope_dim);
        store_row(m, &K, (int64_t)h * m->max_len + pos, k + h * hd);
        store_row(m, &V, (int64_t)h * m->max_len + pos, v + h * hd);
    }
    const int64_t start = m->window > 0 && pos - m->window + 1 > 0 ? pos - m->window + 1 : 0;
    attention(m, q, &K, &V, start, pos, att, scores, nthreads);
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
