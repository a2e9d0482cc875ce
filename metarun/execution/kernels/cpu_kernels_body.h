/* The kernels for one element type T (float or double), named NAME(kernel); included by
 * cpu_kernels.c once per type.
 *
 * Layout: x[n][c][i], i over H*W: one channel is N runs of HW contiguous values. Sums are
 * accumulated in double; `omp simd reduction` (compiled with -fopenmp-simd, no threads) lets
 * the compiler vectorise those loops, with a summation order fixed by the build, so the same
 * library gives the same numbers on every run. */

/* y = (x - mean) rstd w + b with the channel's mean and biased variance; w, b may be NULL. */
/* Channel c's mean and 1 / sqrt(biased variance + eps) over NCHW x: two passes, summed in
 * double. */
static void NAME(channel_stats)(const T *restrict x, int64_t N, int64_t C, int64_t HW, int64_t c,
                                double eps, double *mean_out, double *rstd_out) {
    const double M = (double)(N * HW);
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
    *mean_out = mean;
    *rstd_out = 1.0 / sqrt(ssd / M + eps);
}

/* The normalisation as y = x sc + sh for channel c (w, b may be NULL). */
static void NAME(scale_shift)(double mean, double rstd, const T *w, const T *b, int64_t c,
                              T *sc, T *sh) {
    const double scale = rstd * (w ? (double)w[c] : 1.0);
    *sc = (T)scale;
    *sh = (T)((b ? (double)b[c] : 0.0) - mean * scale);
}

/* The backward's per-channel parts from the channel's sums sgy = sum(gy) and
 * sgyd = sum(gy (x - mean)) over its M elements: gb, gw, and gx = a gy + bx x + d, as
 * gx = w rstd (gy - mean(gy) - xhat mean(gy xhat)) with xhat = (x - mean) rstd. */
static void NAME(backward_parts)(double sgy, double sgyd, double mean, double rstd,
                                 const T *w, int64_t c, double M, T *gw, T *gb, T *a, T *bx,
                                 T *d) {
    const double sgyx = sgyd * rstd;
    *gb = (T)sgy;
    *gw = (T)sgyx;
    const double wr = rstd * (w ? (double)w[c] : 1.0), A = sgy / M, B = sgyx / M;
    *a = (T)wr;
    *bx = (T)(-wr * B * rstd);
    *d = (T)(-wr * A + wr * B * rstd * mean);
}

void NAME(bn_forward)(const T *restrict x, const T *restrict w, const T *restrict b,
                      T *restrict y, T *restrict mean_out, T *restrict rstd_out, int64_t N,
                      int64_t C, int64_t HW, double eps) {
    for (int64_t c = 0; c < C; ++c) {
        double mean, rstd;
        NAME(channel_stats)(x, N, C, HW, c, eps, &mean, &rstd);
        T sc, sh;
        NAME(scale_shift)(mean, rstd, w, b, c, &sc, &sh);
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
        T a, bx, d;
        NAME(backward_parts)(sgy, sgyd, mean, rstd, w, c, M, &gw[c], &gb[c], &a, &bx, &d);
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

/* 2x2 max-pool, stride 2, floor mode, over [N][C][H][W] (channels_last: memory [N][H][W][C]),
 * with PyTorch's semantics: the first maximum in row-major window order wins and NaN
 * propagates. For each output it keeps which of its window's four inputs it took, in one byte:
 * code = 2 * dy + dx, so the backward needs neither the input nor 8-byte indices. */
#define POOL_PICK(a, b, c, d, out, code)                           \
    do {                                                            \
        T best_ = (a), v_ = (b);                                    \
        uint8_t at_ = 0;                                            \
        int t_ = (v_ > best_) | (v_ != v_); /* branch-free: simd */ \
        best_ = t_ ? v_ : best_;                                    \
        at_ = t_ ? 1 : at_;                                         \
        v_ = (c);                                                   \
        t_ = (v_ > best_) | (v_ != v_);                             \
        best_ = t_ ? v_ : best_;                                    \
        at_ = t_ ? 2 : at_;                                         \
        v_ = (d);                                                   \
        t_ = (v_ > best_) | (v_ != v_);                             \
        best_ = t_ ? v_ : best_;                                    \
        at_ = t_ ? 3 : at_;                                         \
        (out) = best_;                                              \
        (code) = at_;                                               \
    } while (0)

void NAME(max_pool2x2)(const T *restrict x, T *restrict y, uint8_t *restrict code, int64_t N,
                       int64_t C, int64_t H, int64_t W, int64_t channels_last) {
    const int64_t OH = H / 2, OW = W / 2;
    if (!channels_last) {
        for (int64_t p = 0; p < N * C; ++p) {
            const T *plane = x + p * H * W;
            T *out = y + p * OH * OW;
            uint8_t *out_code = code + p * OH * OW;
            for (int64_t oh = 0; oh < OH; ++oh) {
                const T *r0 = plane + 2 * oh * W, *r1 = r0 + W;
#pragma omp simd
                for (int64_t ow = 0; ow < OW; ++ow)
                    POOL_PICK(r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1],
                              out[oh * OW + ow], out_code[oh * OW + ow]);
            }
        }
        return;
    }
    for (int64_t n = 0; n < N; ++n)
        for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) {
                const T *a = x + ((n * H + 2 * oh) * W + 2 * ow) * C, *b = a + C;
                const T *c2 = a + W * C, *d = c2 + C;
                const int64_t o = ((n * OH + oh) * OW + ow) * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c)
                    POOL_PICK(a[c], b[c], c2[c], d[c], y[o + c], code[o + c]);
            }
}

/* max-pool's backward: each output's gradient back where the pool took its value, zero at the
 * window's three other places and on a row or column that floor mode left out. `out` is
 * [N][C][H][W] (or channels-last), entirely written. Linear in g; its own backward is
 * gather2x2, whose backward is this. */
void NAME(unpool2x2)(const T *restrict g, const uint8_t *restrict code, T *restrict out,
                     int64_t N, int64_t C, int64_t H, int64_t W, int64_t channels_last) {
    const int64_t OH = H / 2, OW = W / 2;
    if (!channels_last) {
        for (int64_t p = 0; p < N * C; ++p) {
            const T *gp = g + p * OH * OW;
            const uint8_t *cp = code + p * OH * OW;
            T *plane = out + p * H * W;
            for (int64_t oh = 0; oh < OH; ++oh) {
                T *r0 = plane + 2 * oh * W, *r1 = r0 + W;
                for (int64_t ow = 0; ow < OW; ++ow) {
                    const T v = gp[oh * OW + ow];
                    const uint8_t k = cp[oh * OW + ow];
                    r0[2 * ow] = k == 0 ? v : (T)0;
                    r0[2 * ow + 1] = k == 1 ? v : (T)0;
                    r1[2 * ow] = k == 2 ? v : (T)0;
                    r1[2 * ow + 1] = k == 3 ? v : (T)0;
                }
                if (W % 2) r0[W - 1] = r1[W - 1] = (T)0;
            }
            if (H % 2)
                for (int64_t w = 0; w < W; ++w) plane[(H - 1) * W + w] = (T)0;
        }
        return;
    }
    for (int64_t n = 0; n < N; ++n) {
        T *image = out + n * H * W * C;
        for (int64_t oh = 0; oh < OH; ++oh) {
            for (int64_t ow = 0; ow < OW; ++ow) {
                T *a = image + ((2 * oh) * W + 2 * ow) * C, *b = a + C;
                T *c2 = a + W * C, *d = c2 + C;
                const int64_t o = ((n * OH + oh) * OW + ow) * C;
                for (int64_t c = 0; c < C; ++c) {
                    const T v = g[o + c];
                    const uint8_t k = code[o + c];
                    a[c] = k == 0 ? v : (T)0;
                    b[c] = k == 1 ? v : (T)0;
                    c2[c] = k == 2 ? v : (T)0;
                    d[c] = k == 3 ? v : (T)0;
                }
            }
            if (W % 2)
                for (int64_t c = 0; c < C; ++c) {
                    image[(2 * oh * W + W - 1) * C + c] = (T)0;
                    image[((2 * oh + 1) * W + W - 1) * C + c] = (T)0;
                }
        }
        if (H % 2)
            for (int64_t i = 0; i < W * C; ++i) image[(H - 1) * W * C + i] = (T)0;
    }
}

/* The values of `full` ([N][C][H][W] or channels-last) where the pool took its outputs: the
 * backward of unpool2x2 (and, on the pool's input, the pool itself). */
void NAME(gather2x2)(const T *restrict full, const uint8_t *restrict code, T *restrict out,
                     int64_t N, int64_t C, int64_t H, int64_t W, int64_t channels_last) {
    const int64_t OH = H / 2, OW = W / 2;
    if (!channels_last) {
        for (int64_t p = 0; p < N * C; ++p) {
            const T *plane = full + p * H * W;
            const uint8_t *cp = code + p * OH * OW;
            T *op = out + p * OH * OW;
            for (int64_t oh = 0; oh < OH; ++oh)
                for (int64_t ow = 0; ow < OW; ++ow) {
                    const uint8_t k = cp[oh * OW + ow];
                    op[oh * OW + ow] = plane[(2 * oh + (k >> 1)) * W + 2 * ow + (k & 1)];
                }
        }
        return;
    }
    for (int64_t n = 0; n < N; ++n)
        for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) {
                const T *a = full + ((n * H + 2 * oh) * W + 2 * ow) * C;
                const int64_t o = ((n * OH + oh) * OW + ow) * C;
                for (int64_t c = 0; c < C; ++c) {
                    const uint8_t k = code[o + c];
                    out[o + c] = a[((k >> 1) * W + (k & 1)) * C + c];
                }
            }
}

/* Batch-norm (batch statistics) followed by a 2x2 max-pool, in one op: what bn_forward then
 * max_pool2x2 compute, without writing the normalised tensor (four times the pooled one). The
 * pool compares the normalised values, so the same element is taken as on bn_forward's output
 * (ties and NaN included). x is [N][C][H][W] (channels_last: memory [N][H][W][C]); y and code
 * follow x's layout, at half the height and width. */
void NAME(bn_pool_forward)(const T *restrict x, const T *restrict w, const T *restrict b,
                           T *restrict y, uint8_t *restrict code, T *restrict mean_out,
                           T *restrict rstd_out, int64_t N, int64_t C, int64_t H, int64_t W,
                           int64_t channels_last, double eps) {
    const int64_t HW = H * W, OH = H / 2, OW = W / 2;
    const double M = (double)(N * HW);
    if (!channels_last) {
        for (int64_t c = 0; c < C; ++c) {
            double mean, rstd;
            NAME(channel_stats)(x, N, C, HW, c, eps, &mean, &rstd);
            T sc, sh;
            NAME(scale_shift)(mean, rstd, w, b, c, &sc, &sh);
            for (int64_t n = 0; n < N; ++n) {
                const T *plane = x + (n * C + c) * HW;
                T *out = y + (n * C + c) * OH * OW;
                uint8_t *out_code = code + (n * C + c) * OH * OW;
                for (int64_t oh = 0; oh < OH; ++oh) {
                    const T *r0 = plane + 2 * oh * W, *r1 = r0 + W;
#pragma omp simd
                    for (int64_t ow = 0; ow < OW; ++ow)
                        POOL_PICK(r0[2 * ow] * sc + sh, r0[2 * ow + 1] * sc + sh,
                                  r1[2 * ow] * sc + sh, r1[2 * ow + 1] * sc + sh,
                                  out[oh * OW + ow], out_code[oh * OW + ow]);
                }
            }
            mean_out[c] = (T)mean;
            rstd_out[c] = (T)rstd;
        }
        return;
    }
    /* Channels-last: each pass walks the [N*H*W][C] rows, vectorised over the channels. */
    double *sum = calloc((size_t)(2 * C), sizeof(double)), *ssd = sum + C;
    T *sc = malloc((size_t)(2 * C) * sizeof(T)), *sh = sc + C;
    if (!sum || !sc) abort();
    for (int64_t r = 0; r < N * HW; ++r) {
        const T *restrict xr = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) sum[c] += (double)xr[c];
    }
    for (int64_t c = 0; c < C; ++c) sum[c] /= M; /* now the mean */
    for (int64_t r = 0; r < N * HW; ++r) {
        const T *restrict xr = x + r * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
            const double d = (double)xr[c] - sum[c];
            ssd[c] += d * d;
        }
    }
    for (int64_t c = 0; c < C; ++c) {
        const double mean = sum[c], rstd = 1.0 / sqrt(ssd[c] / M + eps);
        NAME(scale_shift)(mean, rstd, w, b, c, &sc[c], &sh[c]);
        mean_out[c] = (T)mean;
        rstd_out[c] = (T)rstd;
    }
    for (int64_t n = 0; n < N; ++n)
        for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) {
                const T *a = x + ((n * H + 2 * oh) * W + 2 * ow) * C, *b2 = a + C;
                const T *c2 = a + W * C, *d = c2 + C;
                const int64_t o = ((n * OH + oh) * OW + ow) * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c)
                    POOL_PICK(a[c] * sc[c] + sh[c], b2[c] * sc[c] + sh[c],
                              c2[c] * sc[c] + sh[c], d[c] * sc[c] + sh[c], y[o + c],
                              code[o + c]);
            }
    free(sum);
    free(sc);
}

/* The backward of bn_pool_forward, from the pooled gradient gp and the codes: bn_backward of
 * the unpooled gradient (gp where the pool took its value, zero elsewhere) without writing
 * that gradient. Its sums run over the taken places only; then one sweep writes
 * gx = a gy + bx x + d (gy zero off the taken places). */
void NAME(bn_pool_backward)(const T *restrict gp, const uint8_t *restrict code,
                            const T *restrict x, const T *restrict mean_in,
                            const T *restrict rstd_in, const T *restrict w, T *restrict gx,
                            T *restrict gw, T *restrict gb, int64_t N, int64_t C, int64_t H,
                            int64_t W, int64_t channels_last) {
    const int64_t HW = H * W, OH = H / 2, OW = W / 2;
    const double M = (double)(N * HW);
    if (!channels_last) {
        for (int64_t c = 0; c < C; ++c) {
            const double mean = mean_in[c], rstd = rstd_in[c];
            double sgy = 0.0, sgyd = 0.0;
            for (int64_t n = 0; n < N; ++n) {
                const T *plane = x + (n * C + c) * HW;
                const T *gs = gp + (n * C + c) * OH * OW;
                const uint8_t *cs = code + (n * C + c) * OH * OW;
                for (int64_t oh = 0; oh < OH; ++oh)
                    for (int64_t ow = 0; ow < OW; ++ow) {
                        const uint8_t k = cs[oh * OW + ow];
                        const double g = gs[oh * OW + ow];
                        sgy += g;
                        sgyd += g * ((double)plane[(2 * oh + (k >> 1)) * W + 2 * ow + (k & 1)]
                                     - mean);
                    }
            }
            T a, bx, d;
            NAME(backward_parts)(sgy, sgyd, mean, rstd, w, c, M, &gw[c], &gb[c], &a, &bx, &d);
            for (int64_t n = 0; n < N; ++n) {
                const T *xs = x + (n * C + c) * HW;
                T *out = gx + (n * C + c) * HW;
#pragma omp simd
                for (int64_t i = 0; i < HW; ++i) out[i] = bx * xs[i] + d;
                const T *gs = gp + (n * C + c) * OH * OW;
                const uint8_t *cs = code + (n * C + c) * OH * OW;
                for (int64_t oh = 0; oh < OH; ++oh)
                    for (int64_t ow = 0; ow < OW; ++ow) {
                        const uint8_t k = cs[oh * OW + ow];
                        const int64_t i = (2 * oh + (k >> 1)) * W + 2 * ow + (k & 1);
                        out[i] = a * gs[oh * OW + ow] + bx * xs[i] + d;
                    }
            }
        }
        return;
    }
    double *sgy = calloc((size_t)(2 * C), sizeof(double)), *sgyd = sgy + C;
    T *ca = malloc((size_t)(3 * C) * sizeof(T)), *cb = ca + C, *cd = cb + C;
    if (!sgy || !ca) abort();
    for (int64_t n = 0; n < N; ++n)
        for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow) {
                const T *p0 = x + ((n * H + 2 * oh) * W + 2 * ow) * C, *p1 = p0 + C;
                const T *p2 = p0 + W * C, *p3 = p2 + C;
                const int64_t o = ((n * OH + oh) * OW + ow) * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    const uint8_t k = code[o + c];
                    const T v = k == 0 ? p0[c] : k == 1 ? p1[c] : k == 2 ? p2[c] : p3[c];
                    const double g = gp[o + c];
                    sgy[c] += g;
                    sgyd[c] += g * ((double)v - (double)mean_in[c]);
                }
            }
    for (int64_t c = 0; c < C; ++c)
        NAME(backward_parts)(sgy[c], sgyd[c], mean_in[c], rstd_in[c], w, c, M, &gw[c], &gb[c],
                             &ca[c], &cb[c], &cd[c]);
    for (int64_t n = 0; n < N; ++n) {
        for (int64_t oh = 0; oh < OH; ++oh) {
            for (int64_t ow = 0; ow < OW; ++ow) {
                const int64_t i0 = ((n * H + 2 * oh) * W + 2 * ow) * C;
                const int64_t i1 = i0 + C, i2 = i0 + W * C, i3 = i2 + C;
                const int64_t o = ((n * OH + oh) * OW + ow) * C;
#pragma omp simd
                for (int64_t c = 0; c < C; ++c) {
                    const uint8_t k = code[o + c];
                    const T ag = ca[c] * gp[o + c];
                    gx[i0 + c] = (k == 0 ? ag : (T)0) + cb[c] * x[i0 + c] + cd[c];
                    gx[i1 + c] = (k == 1 ? ag : (T)0) + cb[c] * x[i1 + c] + cd[c];
                    gx[i2 + c] = (k == 2 ? ag : (T)0) + cb[c] * x[i2 + c] + cd[c];
                    gx[i3 + c] = (k == 3 ? ag : (T)0) + cb[c] * x[i3 + c] + cd[c];
                }
            }
            if (W % 2)
                for (int64_t r = 2 * oh; r < 2 * oh + 2; ++r) {
                    const int64_t i = ((n * H + r) * W + W - 1) * C;
#pragma omp simd
                    for (int64_t c = 0; c < C; ++c) gx[i + c] = cb[c] * x[i + c] + cd[c];
                }
        }
        if (H % 2) {
            const int64_t i = (n * H + H - 1) * W * C;
            for (int64_t j = 0; j < W; ++j)
#pragma omp simd
                for (int64_t c = 0; c < C; ++c)
                    gx[i + j * C + c] = cb[c] * x[i + j * C + c] + cd[c];
        }
    }
    free(sgy);
    free(ca);
}
#undef POOL_PICK
