/* metarun's fused CPU kernels for NCHW-contiguous batch-norm (batch statistics, no running
 * statistics) and 2x2 max-pooling: the passes second-order MAML differentiates twice.
 *
 * PyTorch runs these ops in NCHW on slow per-plane paths, and writes the double backward of
 * batch-norm as some thirty whole-tensor operations. Here each is one or two sweeps per
 * channel over data that fits in cache. Plain C with no torch headers, so it compiles in about
 * a second (metarun/kernels/__init__.py builds it on first use and caches the library).
 *
 * Layout: x[n][c][i] with i over H*W; a channel's elements are N runs of HW contiguous values.
 * Sums are taken in double, in LANES independent partial sums so that the compiler can
 * vectorise them without reordering any one sum (no -ffast-math).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#define LANES 8

/* sum over one channel of f(i) for i over each of the N runs; f reads index `k`. */
#define CHANNEL_SUM(T, acc, expr)                                                   \
    do {                                                                            \
        double lanes_[LANES] = {0};                                                 \
        double tail_ = 0.0;                                                         \
        for (int64_t n_ = 0; n_ < N; ++n_) {                                        \
            const int64_t base_ = (n_ * C + c) * HW;                                \
            int64_t i_ = 0;                                                         \
            for (; i_ + LANES <= HW; i_ += LANES)                                   \
                for (int l_ = 0; l_ < LANES; ++l_) {                                \
                    const int64_t k = base_ + i_ + l_;                              \
                    lanes_[l_] += (double)(expr);                                   \
                }                                                                   \
            for (; i_ < HW; ++i_) {                                                 \
                const int64_t k = base_ + i_;                                       \
                tail_ += (double)(expr);                                            \
            }                                                                       \
        }                                                                           \
        double s_ = tail_;                                                          \
        for (int l_ = 0; l_ < LANES; ++l_) s_ += lanes_[l_];                        \
        acc = s_;                                                                   \
    } while (0)

#define FOR_CHANNEL(body)                                                           \
    for (int64_t n_ = 0; n_ < N; ++n_) {                                            \
        const int64_t base_ = (n_ * C + c) * HW;                                    \
        for (int64_t i_ = 0; i_ < HW; ++i_) {                                       \
            const int64_t k = base_ + i_;                                           \
            body;                                                                   \
        }                                                                           \
    }

#define DEFINE_KERNELS(T, SUFFIX)                                                   \
/* y = (x - mean) * rstd * w + b, with the channel's biased variance. */            \
void bn_forward_##SUFFIX(const T *x, const T *w, const T *b, T *y, T *mean_out,      \
                         T *rstd_out, int64_t N, int64_t C, int64_t HW, double eps) { \
    const double M = (double)(N * HW);                                              \
    for (int64_t c = 0; c < C; ++c) {                                               \
        double sum, ssd;                                                            \
        CHANNEL_SUM(T, sum, x[k]);                                                  \
        const double mean = sum / M;                                                \
        CHANNEL_SUM(T, ssd, ((double)x[k] - mean) * ((double)x[k] - mean));         \
        const double rstd = 1.0 / sqrt(ssd / M + eps);                              \
        const double scale = rstd * (w ? (double)w[c] : 1.0);                       \
        const T sc = (T)scale;                                                      \
        const T sh = (T)((b ? (double)b[c] : 0.0) - mean * scale);                  \
        FOR_CHANNEL(y[k] = x[k] * sc + sh);                                         \
        mean_out[c] = (T)mean;                                                      \
        rstd_out[c] = (T)rstd;                                                      \
    }                                                                               \
}                                                                                   \
                                                                                    \
/* gx = w rstd (gy - mean(gy) - xhat mean(gy xhat)); gw = sum(gy xhat); gb = sum(gy). */ \
void bn_backward_##SUFFIX(const T *gy, const T *x, const T *mean_in, const T *rstd_in, \
                          const T *w, T *gx, T *gw, T *gb, int64_t N, int64_t C,     \
                          int64_t HW) {                                             \
    const double M = (double)(N * HW);                                              \
    for (int64_t c = 0; c < C; ++c) {                                               \
        const double mean = mean_in[c], rstd = rstd_in[c];                          \
        double sgy, sgyx;                                                           \
        CHANNEL_SUM(T, sgy, gy[k]);                                                 \
        CHANNEL_SUM(T, sgyx, (double)gy[k] * (((double)x[k] - mean) * rstd));       \
        gb[c] = (T)sgy;                                                             \
        gw[c] = (T)sgyx;                                                            \
        const double wr = rstd * (w ? (double)w[c] : 1.0);                          \
        /* gx = wr gy - wr A - wr B rstd (x - mean) = a gy + bx x + d */             \
        const double A = sgy / M, B = sgyx / M;                                     \
        const T a = (T)wr, bx = (T)(-wr * B * rstd);                                \
        const T d = (T)(-wr * A + wr * B * rstd * mean);                            \
        FOR_CHANNEL(gx[k] = a * gy[k] + bx * x[k] + d);                             \
    }                                                                               \
}                                                                                   \
                                                                                    \
/* The gradient of <ggx, gx> + <ggw, gw> + <ggb, gb> (the backward's outputs) with      \
 * respect to the backward's inputs gy, x and w. ggx, ggw or ggb may be NULL (zero).    \
 * With A = mean(gy), B = mean(gy xhat), E = mean(ggx), F = mean(ggx xhat),             \
 * G = sum(ggx gy), r = rstd, M the channel's element count:                            \
 *   g_w  = r (G - M A E - M B F)                                                      \
 *   g_gy = w r (ggx - E - xhat F) + ggw xhat + ggb                                    \
 *   g_x  = -(w r g_w / M) xhat + r (ggw - w r F)(gy - A - xhat B)                     \
 *          - w r^2 B (ggx - E - xhat F)                                               \
 */                                                                                 \
void bn_double_backward_##SUFFIX(const T *ggx, const T *ggw, const T *ggb,          \
                                 const T *gy, const T *x, const T *mean_in,         \
                                 const T *rstd_in, const T *w, T *g_gy, T *g_x,     \
                                 T *g_w, int64_t N, int64_t C, int64_t HW) {        \
    const double M = (double)(N * HW);                                              \
    for (int64_t c = 0; c < C; ++c) {                                               \
        const double mean = mean_in[c], r = rstd_in[c];                             \
        const double wc = w ? (double)w[c] : 1.0;                                   \
        const double ggw_c = ggw ? (double)ggw[c] : 0.0;                            \
        const double ggb_c = ggb ? (double)ggb[c] : 0.0;                            \
        double sgy, sgyx, sgg = 0.0, sggx = 0.0, sggy = 0.0;                        \
        CHANNEL_SUM(T, sgy, gy[k]);                                                 \
        CHANNEL_SUM(T, sgyx, (double)gy[k] * (((double)x[k] - mean) * r));          \
        if (ggx) {                                                                  \
            CHANNEL_SUM(T, sgg, ggx[k]);                                            \
            CHANNEL_SUM(T, sggx, (double)ggx[k] * (((double)x[k] - mean) * r));     \
            CHANNEL_SUM(T, sggy, (double)ggx[k] * (double)gy[k]);                   \
        }                                                                           \
        const double A = sgy / M, B = sgyx / M, E = sgg / M, F = sggx / M;          \
        const double gw_c = r * (sggy - M * A * E - M * B * F);                     \
        if (g_w) g_w[c] = (T)gw_c;                                                  \
        const double wr = wc * r;                                                   \
        /* In terms of x (xhat = r (x - mean)):                                    \
         * g_gy = k1 ggx + k2 xhat + k3                                             \
         * g_x  = a1 xhat + a2 gy + a3 ggx + a4                                     */ \
        const double k1 = wr, k2 = ggw_c - wr * F, k3 = ggb_c - wr * E;             \
        const double a2 = r * (ggw_c - wr * F);                                     \
        const double a3 = -wr * r * B;                                              \
        const double a1 = -(wr * gw_c / M) - a2 * B + wr * r * B * F;               \
        const double a4 = -a2 * A + wr * r * B * E;                                 \
        /* xhat = r x - r mean: fold into the per-channel coefficients. */          \
        const T k2x = (T)(k2 * r), k3x = (T)(k3 - k2 * r * mean);                   \
        const T a1x = (T)(a1 * r), a4x = (T)(a4 - a1 * r * mean);                   \
        const T k1t = (T)k1, a2t = (T)a2, a3t = (T)a3;                              \
        if (ggx) {                                                                  \
            FOR_CHANNEL(g_gy[k] = k1t * ggx[k] + k2x * x[k] + k3x;                  \
                        g_x[k] = a1x * x[k] + a2t * gy[k] + a3t * ggx[k] + a4x);     \
        } else {                                                                    \
            FOR_CHANNEL(g_gy[k] = k2x * x[k] + k3x;                                 \
                        g_x[k] = a1x * x[k] + a2t * gy[k] + a4x);                   \
        }                                                                           \
    }                                                                               \
}                                                                                   \
                                                                                    \
/* 2x2 max-pool, stride 2, floor mode, over planes [P][H][W]: PyTorch's semantics (the    \
 * first maximum in row-major window order wins; NaN propagates); indices are flat         \
 * positions within the input plane, as max_pool2d_with_indices returns them. */         \
void max_pool2x2_##SUFFIX(const T *x, T *y, int64_t *idx, int64_t P, int64_t H,      \
                          int64_t W) {                                              \
    const int64_t OH = H / 2, OW = W / 2;                                           \
    for (int64_t p = 0; p < P; ++p) {                                               \
        const T *plane = x + p * H * W;                                             \
        T *out = y + p * OH * OW;                                                   \
        int64_t *out_idx = idx + p * OH * OW;                                       \
        for (int64_t oh = 0; oh < OH; ++oh) {                                       \
            const T *r0 = plane + 2 * oh * W, *r1 = r0 + W;                         \
            for (int64_t ow = 0; ow < OW; ++ow) {                                   \
                const int64_t i0 = 2 * oh * W + 2 * ow;                             \
                T best = r0[2 * ow];                                                \
                int64_t at = i0;                                                    \
                T v = r0[2 * ow + 1];                                               \
                if (v > best || isnan(v)) { best = v; at = i0 + 1; }                \
                v = r1[2 * ow];                                                     \
                if (v > best || isnan(v)) { best = v; at = i0 + W; }                \
                v = r1[2 * ow + 1];                                                 \
                if (v > best || isnan(v)) { best = v; at = i0 + W + 1; }            \
                out[oh * OW + ow] = best;                                           \
                out_idx[oh * OW + ow] = at;                                         \
            }                                                                       \
        }                                                                           \
    }                                                                               \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

int metarun_kernels_version(void) { return 1; }
