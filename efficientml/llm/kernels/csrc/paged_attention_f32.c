/* fp32 paged attention for decoding on CPU: one query per sequence, keys and values read in place
 * from a block pool through each sequence's block table (no gathered copy of the cache).
 *
 *   q       (B, nh, hd)                   this step's query of each sequence
 *   k, v    (num_blocks, bs, nkv, hd)     one layer of the pool; token p of a sequence lives in
 *                                         block table[p / bs], slot p % bs
 *   tables  (B, max_blocks) int64         block tables (padding entries are never read)
 *   ctx     (B,) int64                    keys of each sequence (its query is the last of them)
 *   out     (B, nh, hd)
 *
 * One work item per (sequence, kv head): the g = nh / nkv query heads of the group read each key
 * and value vector once, from L1 after the first. Softmax in one pass (online: a running max m,
 * running sum l, accumulator rescaled by exp(m_old - m_new) when the max grows), so nothing of
 * length ctx is stored. window > 0: only the last `window` keys (sliding-window attention).
 * Compiled at run time by efficientml/llm/kernels/cpu_paged_attention.py. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_G 16
#define MAX_HD 256

static void one_group(const float *q, const float *k, const float *v, const int64_t *table, int64_t ctx,
                      float *out, int64_t g, int64_t nkv, int64_t hd, int64_t bs, int64_t kvh, float scale,
                      int64_t window) {
    float acc[MAX_G][MAX_HD], m[MAX_G], l[MAX_G];
    for (int64_t h = 0; h < g; h++) {
        m[h] = -INFINITY;
        l[h] = 0.f;
        memset(acc[h], 0, sizeof(float) * hd);
    }
    int64_t lo = (window > 0 && ctx > window) ? ctx - window : 0;
    for (int64_t j = lo; j < ctx; j++) {
        int64_t slot = table[j / bs] * bs + j % bs;
        const float *kj = k + (slot * nkv + kvh) * hd, *vj = v + (slot * nkv + kvh) * hd;
        for (int64_t h = 0; h < g; h++) {
            const float *qh = q + h * hd;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int64_t d = 0; d < hd; d++) s += qh[d] * kj[d];
            s *= scale;
            float mn = s > m[h] ? s : m[h];
            float corr = expf(m[h] - mn), p = expf(s - mn);
            l[h] = l[h] * corr + p;
            m[h] = mn;
            float *a = acc[h];
#pragma omp simd
            for (int64_t d = 0; d < hd; d++) a[d] = a[d] * corr + p * vj[d];
        }
    }
    for (int64_t h = 0; h < g; h++) {
        float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
        for (int64_t d = 0; d < hd; d++) out[h * hd + d] = acc[h][d] * inv;
    }
}

int efficientml_paged_attention_f32(const float *q, const float *k, const float *v, const int64_t *tables,
                                    const int64_t *ctx, float *out, int64_t B, int64_t max_blocks,
                                    int64_t nh, int64_t nkv, int64_t hd, int64_t bs, float scale,
                                    int64_t window) {
    int64_t g = nh / nkv;
    if (g > MAX_G || hd > MAX_HD || nh % nkv) return -1;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t w = 0; w < B * nkv; w++) {
        int64_t b = w / nkv, kvh = w % nkv;
        one_group(q + (b * nh + kvh * g) * hd, k, v, tables + b * max_blocks, ctx[b],
                  out + (b * nh + kvh * g) * hd, g, nkv, hd, bs, kvh, scale, window);
    }
    return 0;
}
