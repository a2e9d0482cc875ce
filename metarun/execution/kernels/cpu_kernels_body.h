/* The kernels for one element type T (float or double), named NAME(kernel); included by
 * cpu_kernels.c once per type.
 *
 * Layout: x[n][c][i], i over H*W: one channel is N runs of HW contiguous values. Sums are
 * accumulated in double; `omp simd reduction` (compiled with -fopenmp-simd, no threads) lets
 * the compiler vectorise those loops, with a summation order fixed by the build, so the same
 * library gives the same numbers on every run. */

/* y = (x - mean) rstd w + b with the channel's mean and biased variance; w, b may be NULL. */
void NAME(bn_forward)(const T *restrict x, const T *restrict w, const T *restrict b,
                      T *restrict y, T *restrict mean_out, T *restrict rstd_out, int64_t N,
                      int64_t C, int64_t HW, double eps) {
    const double M = (double)(N * HW);
    for (int64_t c = 0; c < C; ++c) {
        double sum = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            const T *restrict xs = x + (n * C + c) * HW;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < HW; ++i) sum += (double)xs[i];
        }
        const double mean = sum / M;
        double ssd = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            const T *restrict xs = x + (n * C + c) * HW;
#pragma omp simd reduction(+ : ssd)
            for (int64_t i = 0; i < HW; ++i) {
                const double d = (double)xs[i] - mean;
                ssd += d * d;
            }
        }
        const double rstd = 1.0 / sqrt(ssd / M + eps);
        const double scale = rstd * (w ? (double)w[c] : 1.0);
        const T sc = (T)scale, sh = (T)((b ? (double)b[c] : 0.0) - mean * scale);
        for (int64_t n = 0; n < N; ++n) {
            const T *restrict xs = x + (n * C + c) * HW;
            T *restrict ys = y + (n * C + c) * HW;
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) ys[i] = xs[i] * sc + sh;
        }
        mean_out[c] = (T)mean;
        rstd_out[c] = (T)rstd;
    }
}

/* With xhat = (x - mean) rstd: gb = sum(gy), gw = sum(gy xhat),
 * gx = w rstd (gy - mean(gy) - xhat mean(gy xhat)). */
void NAME(bn_backward)(const T *restrict gy, const T *restrict x, const T *restrict mean_in,
                       const T *restrict rstd_in, const T *restrict w, T *restrict gx,
                       T *restrict gw, T *restrict gb, int64_t N, int64_t C, int64_t HW) {
    const double M = (double)(N * HW);
    for (int64_t c = 0; c < C; ++c) {
        const double mean = mean_in[c], rstd = rstd_in[c];
        double sgy = 0.0, sgyd = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            const T *restrict xs = x + (n * C + c) * HW, *restrict gs = gy + (n * C + c) * HW;
#pragma omp simd reduction(+ : sgy, sgyd)
            for (int64_t i = 0; i < HW; ++i) {
                sgy += (double)gs[i];
                sgyd += (double)gs[i] * ((double)xs[i] - mean);
            }
        }
        const double sgyx = sgyd * rstd;
        gb[c] = (T)sgy;
        gw[c] = (T)sgyx;
        const double wr = rstd * (w ? (double)w[c] : 1.0), A = sgy / M, B = sgyx / M;
        /* gx = wr gy - wr A - wr B rstd (x - mean) = a gy + bx x + d */
        const T a = (T)wr, bx = (T)(-wr * B * rstd), d = (T)(-wr * A + wr * B * rstd * mean);
        for (int64_t n = 0; n < N; ++n) {
            const T *restrict xs = x + (n * C + c) * HW, *restrict gs = gy + (n * C + c) * HW;
            T *restrict out = gx + (n * C + c) * HW;
#pragma omp simd
            for (int64_t i = 0; i < HW; ++i) out[i] = a * gs[i] + bx * xs[i] + d;
        }
    }
}

/* The gradient of <ggx, gx> + <ggw, gw> + <ggb, gb> (the backward's outputs) with respect to
 * the backward's inputs gy, x and w; ggx, ggw or ggb may be NULL (zero). With A = mean(gy),
 * B = mean(gy xhat), E = mean(ggx), F = mean(ggx xhat), G = sum(ggx gy), r = rstd and M the
 * channel's element count:
 *   g_w  = r (G - M A E - M B F)
 *   g_gy = w r (ggx - E - xhat F) + ggw xhat + ggb
 *   g_x  = -(w r g_w / M) xhat + r (ggw - w r F)(gy - A - xhat B) - w r^2 B (ggx - E - xhat F)
 */
void NAME(bn_double_backward)(const T *restrict ggx, const T *restrict ggw,
                              const T *restrict ggb, const T *restrict gy,
                              const T *restrict x, const T *restrict mean_in,
                              const T *restrict rstd_in, const T *restrict w,
                              T *restrict g_gy, T *restrict g_x, T *restrict g_w, int64_t N,
                              int64_t C, int64_t HW) {
    const double M = (double)(N * HW);
    for (int64_t c = 0; c < C; ++c) {
        const double mean = mean_in[c], r = rstd_in[c];
        const double wc = w ? (double)w[c] : 1.0;
        const double ggw_c = ggw ? (double)ggw[c] : 0.0, ggb_c = ggb ? (double)ggb[c] : 0.0;
        double sgy = 0.0, sgyd = 0.0, sgg = 0.0, sggd = 0.0, sggy = 0.0;
        for (int64_t n = 0; n < N; ++n) {
            const int64_t base = (n * C + c) * HW;
            const T *restrict xs = x + base, *restrict gs = gy + base;
            if (ggx) {
                const T *restrict hs = ggx + base;
#pragma omp simd reduction(+ : sgy, sgyd, sgg, sggd, sggy)
                for (int64_t i = 0; i < HW; ++i) {
                    const double d = (double)xs[i] - mean, g = gs[i], h = hs[i];
                    sgy += g;
                    sgyd += g * d;
                    sgg += h;
                    sggd += h * d;
                    sggy += h * g;
                }
            } else {
#pragma omp simd reduction(+ : sgy, sgyd)
                for (int64_t i = 0; i < HW; ++i) {
                    const double g = gs[i];
                    sgy += g;
                    sgyd += g * ((double)xs[i] - mean);
                }
            }
        }
        const double A = sgy / M, B = sgyd * r / M, E = sgg / M, F = sggd * r / M;
        const double gw_c = r * (sggy - M * A * E - M * B * F);
        if (g_w) g_w[c] = (T)gw_c;
        const double wr = wc * r;
        /* g_gy = k1 ggx + k2 xhat + k3;  g_x = a1 xhat + a2 gy + a3 ggx + a4 */
        const double k1 = wr, k2 = ggw_c - wr * F, k3 = ggb_c - wr * E;
        const double a2 = r * (ggw_c - wr * F), a3 = -wr * r * B;
        const double a1 = -(wr * gw_c / M) - a2 * B + wr * r * B * F;
        const double a4 = -a2 * A + wr * r * B * E;
        /* xhat = r x - r mean, folded into the per-channel coefficients */
        const T k1t = (T)k1, k2x = (T)(k2 * r), k3x = (T)(k3 - k2 * r * mean);
        const T a1x = (T)(a1 * r), a2t = (T)a2, a3t = (T)a3, a4x = (T)(a4 - a1 * r * mean);
        for (int64_t n = 0; n < N; ++n) {
            const int64_t base = (n * C + c) * HW;
            const T *restrict xs = x + base, *restrict gs = gy + base;
            T *restrict o_gy = g_gy + base, *restrict o_x = g_x + base;
            if (ggx) {
                const T *restrict hs = ggx + base;
#pragma omp simd
                for (int64_t i = 0; i < HW; ++i) {
                    o_gy[i] = k1t * hs[i] + k2x * xs[i] + k3x;
                    o_x[i] = a1x * xs[i] + a2t * gs[i] + a3t * hs[i] + a4x;
                }
            } else {
#pragma omp simd
                for (int64_t i = 0; i < HW; ++i) {
                    o_gy[i] = k2x * xs[i] + k3x;
                    o_x[i] = a1x * xs[i] + a2t * gs[i] + a4x;
                }
            }
        }
    }
}

/* 2x2 max-pool, stride 2, floor mode, over planes [P][H][W], with PyTorch's semantics: the
 * first maximum in row-major window order wins and NaN propagates; indices are flat positions
 * within the input plane, as max_pool2d_with_indices returns them. */
void NAME(max_pool2x2)(const T *restrict x, T *restrict y, int64_t *restrict idx, int64_t P,
                       int64_t H, int64_t W) {
    const int64_t OH = H / 2, OW = W / 2;
    for (int64_t p = 0; p < P; ++p) {
        const T *plane = x + p * H * W;
        T *out = y + p * OH * OW;
        int64_t *out_idx = idx + p * OH * OW;
        for (int64_t oh = 0; oh < OH; ++oh) {
            const T *r0 = plane + 2 * oh * W, *r1 = r0 + W;
            for (int64_t ow = 0; ow < OW; ++ow) {
                const int64_t i0 = 2 * oh * W + 2 * ow;
                T best = r0[2 * ow];
                int64_t at = i0;
                T v = r0[2 * ow + 1];
                if (v > best || isnan(v)) { best = v; at = i0 + 1; }
                v = r1[2 * ow];
                if (v > best || isnan(v)) { best = v; at = i0 + W; }
                v = r1[2 * ow + 1];
                if (v > best || isnan(v)) { best = v; at = i0 + W + 1; }
                out[oh * OW + ow] = best;
                out_idx[oh * OW + ow] = at;
            }
        }
    }
}
