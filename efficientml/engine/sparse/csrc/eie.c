/* EIE-style sparse weight x sparse activation matrix-vector products (Han et al., ISCA 2016).
 *
 * W (out, in) is pruned and stored column by column (CSC), split into P partitions of consecutive
 * output rows (EIE's processing elements): partition p owns rows [p*R, min((p+1)*R, out)) and keeps,
 * for every input column j, its nonzeros k in [colptr[p*(in+1)+j], colptr[p*(in+1)+j+1]) as a row
 * index local to the partition (uint16: R <= 65535) and a value (fp32, or int8 with one fp32 scale
 * per output row). The input x (after ReLU, mostly zeros) is scanned once for its nonzeros (EIE's
 * leading-nonzero detection); every partition then walks only those columns and accumulates
 * y[row] += W[row, j] * x[j] into its own rows, so partitions (OpenMP threads) never share an output.
 *
 * fp32 path: the sum over a row runs in increasing column order, one product at a time, which is
 * also what a dense loop would do; with -ffp-contract=off there is no fused multiply-add, so the
 * result differs from a BLAS dot product (blocked, reordered) by fp32 rounding only.
 * int8 path: x is quantized per input vector to symmetric int8 (scale = max|x| / 127, round half to
 * even), products accumulate exactly in int32; y = acc * w_scale[row] * x_scale.
 *
 * Portable C (GCC/Clang or any C99 compiler); compiled at run time by efficientml/engine/sparse/eie.py. */
#include <math.h>
#include <stdint.h>

/* Nonzero entries of x: their indices (returned count) — the columns the partitions will visit. */
static int64_t nonzero_columns(const float *x, int64_t n, int32_t *nz) {
    int64_t c = 0;
    for (int64_t j = 0; j < n; j++)
        if (x[j] != 0.f) nz[c++] = (int32_t)j;
    return c;
}

static void part_f32(const int64_t *cp, const uint16_t *rows, const float *vals, const float *x,
                     const int32_t *nz, int64_t nnz_x, float *yb, int64_t nrows, const float *bias) {
    for (int64_t r = 0; r < nrows; r++) yb[r] = bias ? bias[r] : 0.f;
    for (int64_t t = 0; t < nnz_x; t++) {
        const int32_t j = nz[t];
        const float xv = x[j];
        for (int64_t k = cp[j]; k < cp[j + 1]; k++) yb[rows[k]] += vals[k] * xv;
    }
}

/* y (m, out) = x (m, in) W^T (+ bias), fp32 values; nz is scratch of `in` int32. */
void efficientml_eie_f32(const int64_t *colptr, const uint16_t *rows, const float *vals, const float *bias,
                         const float *x, float *y, int32_t *nz, int64_t m, int64_t in, int64_t out,
                         int64_t rows_per_part, int64_t parts, int threads) {
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * in;
        float *yi = y + i * out;
        const int64_t nnz_x = nonzero_columns(xi, in, nz);
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t p = 0; p < parts; p++) {
            const int64_t r0 = p * rows_per_part;
            const int64_t nr = (r0 + rows_per_part <= out ? rows_per_part : out - r0);
            part_f32(colptr + p * (in + 1), rows, vals, xi, nz, nnz_x, yi + r0, nr, bias ? bias + r0 : 0);
        }
    }
}

/* Quantize x to symmetric int8 (nonzeros only: the zeros are never read again). Returns the scale. */
static float quantize_nonzeros(const float *x, const int32_t *nz, int64_t nnz_x, int8_t *qx) {
    float amax = 0.f;
    for (int64_t t = 0; t < nnz_x; t++) {
        const float a = fabsf(x[nz[t]]);
        if (a > amax) amax = a;
    }
    const float scale = amax / 127.0f;
    for (int64_t t = 0; t < nnz_x; t++) {
        float q = nearbyintf(x[nz[t]] / scale);
        qx[t] = (int8_t)(q > 127.f ? 127.f : (q < -127.f ? -127.f : q));
    }
    return scale;
}

static void part_q8(const int64_t *cp, const uint16_t *rows, const int8_t *vals, const int32_t *nz,
                    const int8_t *qx, int64_t nnz_x, int32_t *acc, int64_t nrows) {
    for (int64_t r = 0; r < nrows; r++) acc[r] = 0;
    for (int64_t t = 0; t < nnz_x; t++) {
        const int32_t j = nz[t], xv = qx[t];
        for (int64_t k = cp[j]; k < cp[j + 1]; k++) acc[rows[k]] += (int32_t)vals[k] * xv;
    }
}

/* int8 weights (per-row w_scale) x int8 activations (per-vector scale, written to x_scale[i]):
 * acc (m, out) int32 exact, y (m, out) = acc * w_scale * x_scale (+ bias). Scratch: nz (in) int32,
 * qx (in) int8. */
void efficientml_eie_q8(const int64_t *colptr, const uint16_t *rows, const int8_t *vals, const float *w_scale,
                        const float *bias, const float *x, float *y, int32_t *acc, float *x_scale,
                        int32_t *nz, int8_t *qx, int64_t m, int64_t in, int64_t out,
                        int64_t rows_per_part, int64_t parts, int threads) {
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * in;
        const int64_t nnz_x = nonzero_columns(xi, in, nz);
        const float xs = nnz_x ? quantize_nonzeros(xi, nz, nnz_x, qx) : 0.f;
        x_scale[i] = xs;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t p = 0; p < parts; p++) {
            const int64_t r0 = p * rows_per_part;
            const int64_t nr = (r0 + rows_per_part <= out ? rows_per_part : out - r0);
            int32_t *a = acc + i * out + r0;
            float *yb = y + i * out + r0;
            part_q8(colptr + p * (in + 1), rows, vals, nz, qx, nnz_x, a, nr);
            for (int64_t r = 0; r < nr; r++)
                yb[r] = (float)a[r] * (w_scale[r0 + r] * xs) + (bias ? bias[r0 + r] : 0.f);
        }
    }
}
