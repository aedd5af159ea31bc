/* One step of the serving engine over ragged rows, driven from C (issue #18): every row is one token of
 * some sequence at its own position — a decode, the k + 1 positions a speculative step verifies, or a
 * short prefill chunk — and attends to its own sequence's keys through the sequence's block table, read
 * in place from the engine's block pool (no gathered copy). For every block: RMSNorm over the rows →
 * q/k/v for all rows in one product per weight (the kernels take M rows: one pass over the weights for
 * the whole batch) → (q/k RMSNorm) → RoPE at each row's position → every row's new key and value into
 * its slot → attention per (row, head) → o_proj → residual → RMSNorm → gate/up → SiLU·mul → down →
 * residual; then the final norm and the output projection for the rows whose logits are wanted.
 *
 * The pool is the BlockManager's (layers, num_blocks · block_size slots, n_kv, hd) in fp32, bf16 or fp16
 * (or int8/int4 codes with fp16 scales per group, the same row layout): the em_model is filled with
 * max_len = the number of slots, so layer_view and a row index slot · n_kv + head address it. A row's
 * keys are positions start … pos of its sequence, position j in slot table[j / bs] · bs + j % bs. All
 * rows' keys and values of a layer are written before any row attends, so rows of one sequence at
 * consecutive positions see each other causally (a verified draft, a prefill chunk).
 *
 * Attention is one pass (online softmax) over chunks of 32 keys, so it needs no scores buffer; the
 * (row, head) pairs are split over OpenMP threads. */
#include "decode_common.h"

typedef struct {
    int64_t n;                       /* rows in the step */
    const int64_t *tokens, *pos;     /* (n) */
    const int64_t *table;            /* (n, max_blocks): the block table of each row's sequence */
    int64_t max_blocks, block_size, rope_len;
    int64_t n_out;                   /* rows whose logits are wanted … */
    const int64_t *out_rows;         /* (n_out), ascending */
} em_batch;

#define CHUNK 32

static inline int64_t slot_of(const em_batch *b, int64_t r, int64_t p) {
    return b->table[r * b->max_blocks + p / b->block_size] * b->block_size + p % b->block_size;
}

/* Row r's query head h against its sequence's keys start … pos[r]: out = softmax(scale · q·K) · V. */
static void attend_row(const em_model *m, const em_batch *b, const kv_view *K, const kv_view *V, int64_t r,
                       int h, const float *q, float *out) {
    const int hd = m->hd, kvh = h / (m->n_heads / m->n_kv);
    const int64_t p = b->pos[r];
    const int64_t start = m->window > 0 && p - m->window + 1 > 0 ? p - m->window + 1 : 0;
    float mx = -INFINITY, sum = 0.f, sc[CHUNK];
    int64_t rows[CHUNK];
    for (int i = 0; i < hd; i++) out[i] = 0.f;
    for (int64_t j0 = start; j0 <= p; j0 += CHUNK) {
        const int cnt = p - j0 + 1 < CHUNK ? (int)(p - j0 + 1) : CHUNK;
        float cmx = -INFINITY;
        for (int t = 0; t < cnt; t++) {
            rows[t] = slot_of(b, r, j0 + t) * m->n_kv + kvh;
            sc[t] = key_dot(m, K, rows[t], q) * m->attn_scale;
            cmx = sc[t] > cmx ? sc[t] : cmx;
        }
        if (cmx > mx) {  /* rescale what was summed under the old maximum */
            const float c = expf(mx - cmx);
            sum *= c;
            for (int i = 0; i < hd; i++) out[i] *= c;
            mx = cmx;
        }
        for (int t = 0; t < cnt; t++) {
            const float e = expf(sc[t] - mx);
            sum += e;
            value_acc(m, V, rows[t], e, out);
        }
    }
    for (int i = 0; i < hd; i++) out[i] /= sum;
}

/* ls (a packed group, or its parts) on rows x (n, in) into y (n, ld), the parts side by side; parts that
 * are not packed go through scratch (n, out) and are copied into their columns. */
static int linears_rows(const em_model *m, const em_linear *ls, int cnt, const float *x, int64_t n, float *y,
                        int64_t ld, float *scratch, int nthreads) {
    int64_t col = 0;
    for (int i = 0; i < cnt; i++) {
        if (ls[i].kind == LIN_NONE) continue;
        const int64_t width = ls[i].out;  /* a packed group's first part carries the whole width */
        if (width == ld) {
            if (linear_rows(m, &ls[i], x, n, y, nthreads)) return -1;
        } else {
            if (linear_rows(m, &ls[i], x, n, scratch, nthreads)) return -1;
            for (int64_t r = 0; r < n; r++) memcpy(y + r * ld + col, scratch + r * width, sizeof(float) * width);
        }
        col += width;
    }
    return 0;
}

/* Work floats for n rows: x, xn, tmp (n·d each), qkv (n·(nq + 2nk)), attn out (n·nq), gate|up (n·2ffn),
 * act (n·ffn), scratch for an unpacked linear (n·max(nq + 2nk, 2ffn)). */
int64_t efficientml_paged_work_floats(const em_model *m, int64_t n) {
    const int64_t qkv = (int64_t)(m->n_heads + 2 * m->n_kv) * m->hd, att = (int64_t)m->n_heads * m->hd;
    const int64_t wide = qkv > 2 * (int64_t)m->ffn ? qkv : 2 * (int64_t)m->ffn;
    return n * (3 * (int64_t)m->d + qkv + att + 3 * (int64_t)m->ffn + wide) + 64;
}

/* q/k norms, RoPE at each row's position, and each row's new key and value into its slot. */
static void rope_and_store(const em_model *m, const em_layer *L, const em_batch *b, float *qkv, int64_t W,
                           const kv_view *K, const kv_view *V, int nthreads) {
    const int hd = m->hd, nq = m->n_heads * hd, nk = m->n_kv * hd;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t r = 0; r < b->n; r++) {
        float *q = qkv + r * W, *k = q + nq, *v = k + nk;
        const int64_t p = b->pos[r], slot = slot_of(b, r, p);
        const float *c = m->cos ? m->cos + p * m->rope_dim : NULL, *s = m->cos ? m->sin + p * m->rope_dim : NULL;
        for (int h = 0; h < m->n_heads; h++) {
            if (L->q_norm) rmsnorm(q + h * hd, L->q_norm, hd, m->eps, q + h * hd);
            if (c) rope(q + h * hd, c, s, m->rope_dim);
        }
        for (int h = 0; h < m->n_kv; h++) {
            if (L->k_norm) rmsnorm(k + h * hd, L->k_norm, hd, m->eps, k + h * hd);
            if (c) rope(k + h * hd, c, s, m->rope_dim);
            store_row(m, K, slot * m->n_kv + h, k + h * hd);
            store_row(m, V, slot * m->n_kv + h, v + h * hd);
        }
    }
}

static int block_rows(const em_model *m, const em_batch *b, int li, float *x, int nthreads) {
    const em_layer *L = &m->layers[li];
    const int64_t n = b->n, d = m->d, hd = m->hd, nq = m->n_heads * hd, W = nq + 2 * (int64_t)m->n_kv * hd;
    const int64_t ffn = m->ffn;
    float *xn = x + n * d, *tmp = xn + n * d, *qkv = tmp + n * d, *att = qkv + n * W, *gu = att + n * nq;
    float *a = gu + n * 2 * ffn, *scratch = a + n * ffn;
    for (int64_t r = 0; r < n; r++) rmsnorm(x + r * d, L->attn_norm, d, m->eps, xn + r * d);
    if (linears_rows(m, L->qkv, 3, xn, n, qkv, W, scratch, nthreads)) return -1;
    const kv_view K = layer_view(m, li, 0), V = layer_view(m, li, 1);
    rope_and_store(m, L, b, qkv, W, &K, &V, nthreads);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t rh = 0; rh < n * m->n_heads; rh++) {
        const int64_t r = rh / m->n_heads;
        const int h = (int)(rh % m->n_heads);
        attend_row(m, b, &K, &V, r, h, qkv + r * W + h * hd, att + r * nq + h * hd);
    }
    if (linear_rows(m, &L->o, att, n, tmp, nthreads)) return -1;
    for (int64_t i = 0; i < n * d; i++) x[i] += m->resid_mult * tmp[i];
    for (int64_t r = 0; r < n; r++) rmsnorm(x + r * d, L->mlp_norm, d, m->eps, xn + r * d);
    if (linears_rows(m, L->gu, 2, xn, n, gu, 2 * ffn, scratch, nthreads)) return -1;
    for (int64_t r = 0; r < n; r++)
        for (int64_t i = 0; i < ffn; i++) a[r * ffn + i] = act(gu[r * 2 * ffn + i], m->act) * gu[r * 2 * ffn + ffn + i];
    if (linear_rows(m, &L->down, a, n, tmp, nthreads)) return -1;
    for (int64_t i = 0; i < n * d; i++) x[i] += m->resid_mult * tmp[i];
    return 0;
}

/* The step's rows → logits (n_out, vocab) of the rows b->out_rows. Returns 0; −1 when a kernel failed
 * (workspace allocation, fp16 without compiler support); −2 for a bad token, position or block id. */
int efficientml_paged_step(const em_model *m, const em_batch *b, float *logits, int nthreads) {
    const int64_t n = b->n, d = m->d, slots = m->max_len;
    for (int64_t r = 0; r < n; r++) {
        const int64_t p = b->pos[r];
        if (b->tokens[r] < 0 || b->tokens[r] >= m->vocab || p < 0 || p >= b->rope_len ||
            p / b->block_size >= b->max_blocks)
            return -2;
        for (int64_t j = 0; j <= p / b->block_size; j++) {
            const int64_t blk = b->table[r * b->max_blocks + j];
            if (blk < 0 || (blk + 1) * b->block_size > slots) return -2;
        }
    }
    for (int64_t i = 0; i < b->n_out; i++)
        if (b->out_rows[i] < 0 || b->out_rows[i] >= n) return -2;
    float *x = m->work;
    for (int64_t r = 0; r < n; r++)
        for (int64_t i = 0; i < d; i++) x[r * d + i] = load_dt(m->embed, b->tokens[r] * d + i, m->embed_dtype) * m->emb_mult;
    for (int li = 0; li < m->n_layers; li++)
        if (block_rows(m, b, li, x, nthreads)) return -1;
    float *xn = x + n * d;
    for (int64_t i = 0; i < b->n_out; i++) rmsnorm(x + b->out_rows[i] * d, m->final_norm, d, m->eps, xn + i * d);
    if (b->n_out && linear_rows(m, &m->head, xn, b->n_out, logits, nthreads)) return -1;
    if (m->logit_scale != 1.0f)
        for (int64_t i = 0; i < b->n_out * m->vocab; i++) logits[i] /= m->logit_scale;
    return 0;
}
