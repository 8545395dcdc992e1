/*
 * Pillow's BICUBIC resize of 8-bit RGB images, bit for bit, vectorised; and InternVL tiling.
 *
 * Pillow (src/libImaging/Resample.c) resizes in two separable uint8 passes with 22-bit fixed-point
 * coefficients. Its inner loops are scalar: one output pixel at a time, three channels. This file keeps
 * every arithmetic step of Pillow (coefficients in double, the same rounding to INT32, the same int32
 * sums and clipping) and only changes the loop order, so the compiler can vectorise it:
 *
 * - vertical pass: each output row is a weighted sum of whole input rows, summed across the row;
 * - horizontal pass: a block of ROWS input rows is first transposed to [x][row][channel], so that each
 *   output column is a weighted sum of input columns of ROWS * 3 lanes.
 *
 * Integer sums are exact whatever the order, so the result equals Pillow's. Coefficients are computed
 * exactly as Pillow's precompute_coeffs + normalize_coeffs_8bpc; this file must be compiled with
 * -ffp-contract=off (no fused multiply-add) and without -ffast-math, as Pillow is.
 *
 * Which pass runs first changed in Pillow 13 (vertical first when the height shrinks more than twice as
 * much as the width); the caller passes the rule its Pillow uses. The first pass of a horizontal-first
 * resize only computes the rows the vertical pass reads, as Pillow; the values do not depend on it.
 *
 * Built and checked against the installed Pillow at run time by xtuner_vl/dataset/native.py.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)
#define ROWS 32            /* input rows per horizontal block (32: fastest of 8..64 on AVX2 and AVX-512) */
#define LANES (ROWS * 3)   /* int32 lanes per output column in the horizontal pass */
#define CHUNK 1024         /* bytes of a row summed at once in the vertical pass (int32 accumulators) */

/* Pillow's bicubic_filter (a = -0.5), the same expression. */
static double bicubic_filter(double x) {
#define a -0.5
    if (x < 0.0) {
        x = -x;
    }
    if (x < 1.0) {
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    }
    if (x < 2.0) {
        return (((x - 5) * x + 8) * x - 4) * a;
    }
    return 0.0;
#undef a
}

/* Pillow's precompute_coeffs (box = whole image) followed by normalize_coeffs_8bpc. Returns ksize or 0. */
static int precompute_coeffs(int inSize, int outSize, int **boundsp, int32_t **kkp) {
    float in0 = 0.0f, in1 = (float)inSize;
    double support, scale, filterscale;
    int xx, x, ksize, xmin, xmax;
    int *bounds;
    double *prekk, *k;
    int32_t *kk;

    filterscale = scale = (double)(in1 - in0) / outSize;
    if (filterscale < 1.0) {
        filterscale = 1.0;
    }
    support = 2.0 * filterscale; /* BICUBIC support 2.0 */
    ksize = (int)ceil(support) * 2 + 1;

    prekk = malloc((size_t)outSize * ksize * sizeof(double));
    bounds = malloc((size_t)outSize * 2 * sizeof(int));
    kk = malloc((size_t)outSize * ksize * sizeof(int32_t));
    if (!prekk || !bounds || !kk) {
        free(prekk);
        free(bounds);
        free(kk);
        return 0;
    }
    double inv_filterscale = 1.0 / filterscale;
    for (xx = 0; xx < outSize; xx++) {
        double center = in0 + (xx + 0.5) * scale;
        double ww = 0.0;
        xmin = (int)(center - support + 0.5);
        if (xmin < 0) {
            xmin = 0;
        }
        xmax = (int)(center + support + 0.5);
        if (xmax > inSize) {
            xmax = inSize;
        }
        xmax -= xmin;
        k = &prekk[xx * ksize];
        for (x = 0; x < xmax; x++) {
            double w = bicubic_filter((x + xmin - center + 0.5) * inv_filterscale);
            k[x] = w;
            ww += w;
        }
        if (ww != 0.0) {
            for (x = 0; x < xmax; x++) {
                k[x] /= ww;
            }
        }
        for (; x < ksize; x++) {
            k[x] = 0;
        }
        bounds[xx * 2 + 0] = xmin;
        bounds[xx * 2 + 1] = xmax;
    }
    for (x = 0; x < outSize * ksize; x++) {
        if (prekk[x] < 0) {
            kk[x] = (int)(-0.5 + prekk[x] * (1 << PRECISION_BITS));
        } else {
            kk[x] = (int)(0.5 + prekk[x] * (1 << PRECISION_BITS));
        }
    }
    free(prekk);
    *boundsp = bounds;
    *kkp = kk;
    return ksize;
}

/* Pillow's clip8: the sum shifted down, clamped to 0..255. */
static inline uint8_t clip8(int32_t in) {
    int32_t v = in >> PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

/*
 * Horizontal pass: rows [first, first + nrows) of src (width sw) into dst (width dw, nrows rows).
 * block holds (sw + dw) * LANES bytes: the input rows transposed, then the output columns before they are
 * transposed back into dst.
 */
static void horizontal_pass(const uint8_t *src, int sw, int first, int nrows, uint8_t *dst, int dw, int ksize,
                            const int *bounds, const int32_t *kk, uint8_t *block) {
    uint8_t *oblock = block + (size_t)sw * LANES;
    const size_t src_stride = (size_t)sw * 3, dst_stride = (size_t)dw * 3;
    for (int y0 = 0; y0 < nrows; y0 += ROWS) {
        const int r = nrows - y0 < ROWS ? nrows - y0 : ROWS;
        /* transpose ROWS rows to block[x][row][channel]; lanes of missing rows keep stale values */
        for (int j = 0; j < r; j++) {
            const uint8_t *line = src + (size_t)(first + y0 + j) * src_stride;
            uint8_t *col = block + j * 3;
            for (int x = 0; x < sw; x++) {
                col[(size_t)x * LANES + 0] = line[x * 3 + 0];
                col[(size_t)x * LANES + 1] = line[x * 3 + 1];
                col[(size_t)x * LANES + 2] = line[x * 3 + 2];
            }
        }
        for (int xx = 0; xx < dw; xx++) {
            int32_t acc[LANES];
            const int xmin = bounds[xx * 2 + 0], xmax = bounds[xx * 2 + 1];
            const int32_t *k = kk + (size_t)xx * ksize;
            const uint8_t *cols = block + (size_t)xmin * LANES;
            for (int i = 0; i < LANES; i++) {
                acc[i] = 1 << (PRECISION_BITS - 1);
            }
            for (int x = 0; x < xmax; x++) {
                const int32_t c = k[x];
                const uint8_t *col = cols + (size_t)x * LANES;
                for (int i = 0; i < LANES; i++) {
                    acc[i] += col[i] * c;
                }
            }
            uint8_t *o = oblock + (size_t)xx * LANES;
            for (int i = 0; i < LANES; i++) {
                o[i] = clip8(acc[i]);
            }
        }
        for (int j = 0; j < r; j++) {
            uint8_t *out = dst + (size_t)(y0 + j) * dst_stride;
            const uint8_t *o = oblock + j * 3;
            for (int xx = 0; xx < dw; xx++) {
                out[xx * 3 + 0] = o[(size_t)xx * LANES + 0];
                out[xx * 3 + 1] = o[(size_t)xx * LANES + 1];
                out[xx * 3 + 2] = o[(size_t)xx * LANES + 2];
            }
        }
    }
}

/* Vertical pass: src (rows of `width` pixels) into dst (dh rows); bounds index src rows. */
static void vertical_pass(const uint8_t *src, int width, uint8_t *dst, int dh, int ksize, const int *bounds,
                          const int32_t *kk) {
    const size_t stride = (size_t)width * 3;
    int32_t acc[CHUNK];
    for (int yy = 0; yy < dh; yy++) {
        const int ymin = bounds[yy * 2 + 0], ymax = bounds[yy * 2 + 1];
        const int32_t *k = kk + (size_t)yy * ksize;
        uint8_t *out = dst + (size_t)yy * stride;
        for (size_t i0 = 0; i0 < stride; i0 += CHUNK) {
            const int n = stride - i0 < CHUNK ? (int)(stride - i0) : CHUNK;
            for (int i = 0; i < n; i++) {
                acc[i] = 1 << (PRECISION_BITS - 1);
            }
            for (int y = 0; y < ymax; y++) {
                const int32_t c = k[y];
                const uint8_t *line = src + (size_t)(ymin + y) * stride + i0;
                for (int i = 0; i < n; i++) {
                    acc[i] += line[i] * c;
                }
            }
            for (int i = 0; i < n; i++) {
                out[i0 + i] = clip8(acc[i]);
            }
        }
    }
}

/*
 * Resize packed RGB src [sh][sw][3] to dst [dh][dw][3] as Pillow's Image.resize((dw, dh), BICUBIC).
 * pillow13_order: 1 for Pillow >= 13's pass order, 0 for horizontal first always (Pillow <= 12).
 * Returns 0, or -1 when memory runs out.
 */
int xvl_resize_rgb(const uint8_t *src, int sw, int sh, uint8_t *dst, int dw, int dh, int pillow13_order) {
    const int need_h = dw != sw, need_v = dh != sh;
    const int horizontal_first = !pillow13_order || !((sh - dh) > 0 && (sh - dh) > (sw - dw) * 2);
    int *bounds_h = NULL, *bounds_v = NULL;
    int32_t *kk_h = NULL, *kk_v = NULL;
    int ksize_h = 0, ksize_v = 0, status = -1;
    uint8_t *tmp = NULL, *block = NULL;

    if (!need_h && !need_v) {
        memcpy(dst, src, (size_t)sw * sh * 3);
        return 0;
    }
    if (need_v && !(ksize_v = precompute_coeffs(sh, dh, &bounds_v, &kk_v))) {
        goto end;
    }
    if (need_h) {
        if (!(ksize_h = precompute_coeffs(sw, dw, &bounds_h, &kk_h))) {
            goto end;
        }
        /* transposed input columns and output columns of one block of rows */
        if (!(block = calloc((size_t)(sw + dw) * LANES, 1))) {
            goto end;
        }
    }
    if (!need_v) {
        horizontal_pass(src, sw, 0, sh, dst, dw, ksize_h, bounds_h, kk_h, block);
    } else if (!need_h) {
        vertical_pass(src, sw, dst, dh, ksize_v, bounds_v, kk_v);
    } else if (horizontal_first) {
        /* only the source rows the vertical pass reads, with its bounds shifted to them */
        const int first = bounds_v[0];
        const int last = bounds_v[dh * 2 - 2] + bounds_v[dh * 2 - 1];
        if (!(tmp = malloc((size_t)dw * (last - first) * 3))) {
            goto end;
        }
        for (int i = 0; i < dh; i++) {
            bounds_v[i * 2] -= first;
        }
        horizontal_pass(src, sw, first, last - first, tmp, dw, ksize_h, bounds_h, kk_h, block);
        vertical_pass(tmp, dw, dst, dh, ksize_v, bounds_v, kk_v);
    } else {
        if (!(tmp = malloc((size_t)sw * dh * 3))) {
            goto end;
        }
        vertical_pass(src, sw, tmp, dh, ksize_v, bounds_v, kk_v);
        horizontal_pass(tmp, sw, 0, dh, dst, dw, ksize_h, bounds_h, kk_h, block);
    }
    status = 0;
end:
    free(bounds_h);
    free(kk_h);
    free(bounds_v);
    free(kk_v);
    free(tmp);
    free(block);
    return status;
}

/*
 * Cut packed RGB src [rows * size][cols * size][3] into tiles, row by row, and write each as planes
 * out[tile][channel][y][x] = lut[channel * 256 + value]: the caller's table holds torchvision's
 * ToTensor + Normalize of every uint8 value, so this is that transform exactly.
 */
void xvl_tiles_from_rgb(const uint8_t *src, int cols, int rows, int size, const float *lut, float *out) {
    const size_t stride = (size_t)cols * size * 3, plane = (size_t)size * size;
    const float *lut_r = lut, *lut_g = lut + 256, *lut_b = lut + 512;
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) {
            float *red = out + (size_t)(r * cols + c) * 3 * plane, *green = red + plane, *blue = green + plane;
            for (int y = 0; y < size; y++) {
                const uint8_t *line = src + (size_t)(r * size + y) * stride + (size_t)c * size * 3;
                const size_t o = (size_t)y * size;
                for (int x = 0; x < size; x++) {
                    red[o + x] = lut_r[line[x * 3 + 0]];
                    green[o + x] = lut_g[line[x * 3 + 1]];
                    blue[o + x] = lut_b[line[x * 3 + 2]];
                }
            }
        }
    }
}
