/* flatl2o CPU fast path: one whole learned-rule step per tile of 16 coordinates.
 *
 * Computes exactly the function of flatl2o.rules (L2O-DM and RNNprop: preprocessing,
 * stacked LSTM cells, read-out) for each coordinate, but keeps every intermediate of a tile
 * in registers/L1: the gradient and the recurrent state are read once and written once, the
 * gate pre-activations are a register-blocked matrix-vector product per tile, and the
 * nonlinearities use vectorizable polynomial exp/log (Cephes, about 1 ulp), so the loop
 * auto-vectorizes without libm's vector ABI. No allocation, no threads: the Python side
 * splits coordinates across threads (ctypes releases the GIL).
 *
 * Built at first use by flatl2o/kernels/cpu.py with the system C compiler; the reference
 * torch path is used when no compiler is available.
 */
#include <stdint.h>
#include <string.h>

#define TILE 16
#define MAX_LAYERS 4
#define MAX_HIDDEN 64
#define MAX_INPUT 64

typedef struct {
    /* per-coordinate arrays, already offset to the first coordinate of this call */
    const float *grad;  /* gradient (fp32) */
    float *param;       /* fp32 parameter to update in place, or NULL */
    float *delta;       /* where to write the step when param is NULL */
    float lr;           /* param -= lr * step */
    int32_t negate;     /* maximize: the rule sees -grad */

    int32_t prep;       /* 0: L2O-DM log/sign, 1: RNNprop Adam-normalized */
    float dm_inv_k, dm_eps, dm_exp_k;
    float *m, *v;       /* RNNprop moving averages (n) */
    float beta1, beta2, inv_bc1, inv_bc2, rp_eps;
    int32_t in_size;            /* RNNprop ELU input layer width (0: none) */
    const float *w_in, *b_in;   /* (in_size, 2), (in_size) */

    int32_t layers, hidden;
    float *h[MAX_LAYERS], *c[MAX_LAYERS];  /* (n, hidden) row-major */
    const float *w[MAX_LAYERS];  /* (4*hidden, k_l + hidden): [W_ih | W_hh], gate order i,f,g,o */
    const float *b[MAX_LAYERS];  /* (4*hidden): b_ih + b_hh */
    int32_t k[MAX_LAYERS];       /* input width of layer l */

    const float *w_out;  /* (hidden) */
    float b_out;
    int32_t out_tanh;
    float scale;
} flatl2o_args;

typedef union { float f; int32_t i; } fbits;

/* Cephes expf, range-clamped so 2^n stays a normal number. */
static inline float exp_poly(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float fx = x * 1.44269504088896341f + 0.5f;
    fx = (float)(int32_t)fx - (fx < (float)(int32_t)fx ? 1.0f : 0.0f); /* floor */
    float r = x - fx * 0.693359375f + fx * 2.12194440e-4f;
    float z = r * r;
    float y = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f;
    y = y * z + r + 1.0f;
    fbits p;
    p.i = ((int32_t)fx + 127) << 23;
    return y * p.f;
}

/* Cephes logf for positive normal x. */
static inline float log_poly(float x) {
    fbits u;
    u.f = x;
    int32_t e = ((u.i >> 23) & 0xff) - 126;
    u.i = (u.i & 0x007fffff) | 0x3f000000; /* mantissa in [0.5, 1) */
    float m = u.f;
    int32_t small = m < 0.707106781186547524f;
    e -= small;
    m = small ? m + m - 1.0f : m - 1.0f;
    float z = m * m;
    float y = ((((((((7.0376836292e-2f * m - 1.1514610310e-1f) * m + 1.1676998740e-1f) * m -
                    1.2420140846e-1f) * m + 1.4249322787e-1f) * m - 1.6668057665e-1f) * m +
                 2.0000714765e-1f) * m - 2.4999993993e-1f) * m + 3.3333331174e-1f) * m * z;
    float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return m + y + 0.693359375f * fe;
}

#ifdef FLATL2O_PROFILE_CHEAP_NONLINEAR
/* benchmarks/cpu_profile.py only: wrong numbers, used to time the step without exp/div */
static inline float sigmoid_poly(float x) { return 0.5f + 0.25f * x; }
static inline float tanh_poly(float x) { return 0.5f * x; }
#else
static inline float sigmoid_poly(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
static inline float tanh_poly(float x) { return 1.0f - 2.0f / (1.0f + exp_poly(2.0f * x)); }
#endif

/* out[r][t] = bias[r] + sum_j W[r][j] * in[j][t]. Rows are blocked by 8 (a last block of
 * 4: R = 4H is a multiple of 4): 8 independent accumulator vectors hide the FMA latency, and
 * each in[j] vector load feeds 8 FMAs. Written out so compilers keep them in registers. */
static inline void matvec_tile(const float *W, const float *bias, int R, int K,
                               float in[][TILE], float out[][TILE]) {
    int r = 0;
    for (; r + 8 <= R; r += 8) {
        float a0[TILE], a1[TILE], a2[TILE], a3[TILE], a4[TILE], a5[TILE], a6[TILE], a7[TILE];
        for (int t = 0; t < TILE; ++t) {
            a0[t] = bias[r];
            a1[t] = bias[r + 1];
            a2[t] = bias[r + 2];
            a3[t] = bias[r + 3];
            a4[t] = bias[r + 4];
            a5[t] = bias[r + 5];
            a6[t] = bias[r + 6];
            a7[t] = bias[r + 7];
        }
        const float *w0 = W + (int64_t)r * K;
        for (int j = 0; j < K; ++j) {
            const float c0 = w0[j], c1 = w0[K + j], c2 = w0[2 * K + j], c3 = w0[3 * K + j];
            const float c4 = w0[4 * K + j], c5 = w0[5 * K + j], c6 = w0[6 * K + j],
                        c7 = w0[7 * K + j];
            for (int t = 0; t < TILE; ++t) {
                const float x = in[j][t];
                a0[t] += c0 * x;
                a1[t] += c1 * x;
                a2[t] += c2 * x;
                a3[t] += c3 * x;
                a4[t] += c4 * x;
                a5[t] += c5 * x;
                a6[t] += c6 * x;
                a7[t] += c7 * x;
            }
        }
        for (int t = 0; t < TILE; ++t) {
            out[r][t] = a0[t];
            out[r + 1][t] = a1[t];
            out[r + 2][t] = a2[t];
            out[r + 3][t] = a3[t];
            out[r + 4][t] = a4[t];
            out[r + 5][t] = a5[t];
            out[r + 6][t] = a6[t];
            out[r + 7][t] = a7[t];
        }
    }
    for (; r < R; r += 4) {
        float a0[TILE], a1[TILE], a2[TILE], a3[TILE];
        for (int t = 0; t < TILE; ++t) {
            a0[t] = bias[r];
            a1[t] = bias[r + 1];
            a2[t] = bias[r + 2];
            a3[t] = bias[r + 3];
        }
        const float *w0 = W + (int64_t)r * K;
        for (int j = 0; j < K; ++j) {
            const float c0 = w0[j], c1 = w0[K + j], c2 = w0[2 * K + j], c3 = w0[3 * K + j];
            for (int t = 0; t < TILE; ++t) {
                const float x = in[j][t];
                a0[t] += c0 * x;
                a1[t] += c1 * x;
                a2[t] += c2 * x;
                a3[t] += c3 * x;
            }
        }
        for (int t = 0; t < TILE; ++t) {
            out[r][t] = a0[t];
            out[r + 1][t] = a1[t];
            out[r + 2][t] = a2[t];
            out[r + 3][t] = a3[t];
        }
    }
}

/* One rule step for `count` coordinates. Returns 0, or -1 for an unsupported shape. */
int flatl2o_step(const flatl2o_args *a, int64_t count) {
    const int H = a->hidden, L = a->layers;
    if (H > MAX_HIDDEN || L > MAX_LAYERS || a->in_size > MAX_INPUT) return -1;
    for (int l = 0; l < L; ++l)
        if (a->k[l] > MAX_INPUT) return -1;

    float in[MAX_INPUT + MAX_HIDDEN][TILE]; /* [x ; h] of the current layer */
    float gates[4 * MAX_HIDDEN][TILE];
    float cell[MAX_HIDDEN][TILE];
    float g[TILE], x0[TILE], x1[TILE], out[TILE];

    for (int64_t i0 = 0; i0 < count; i0 += TILE) {
        const int n = count - i0 < TILE ? (int)(count - i0) : TILE;
        for (int t = 0; t < TILE; ++t) g[t] = t < n ? a->grad[i0 + t] : 0.0f;
        if (a->negate)
            for (int t = 0; t < TILE; ++t) g[t] = -g[t];

        /* ---- preprocessing: the network input of layer 0 in in[0 .. k0) ---- */
        int k0;
        if (a->prep == 0) { /* L2O-DM: [clamp(log(|g|+eps)/k, min=-1), clamp(g*e^k, -1, 1)] */
            for (int t = 0; t < TILE; ++t) {
                float l = log_poly((g[t] < 0 ? -g[t] : g[t]) + a->dm_eps) * a->dm_inv_k;
                in[0][t] = l < -1.0f ? -1.0f : l;
                float s = g[t] * a->dm_exp_k;
                s = s < -1.0f ? -1.0f : s;
                in[1][t] = s > 1.0f ? 1.0f : s;
            }
            k0 = 2;
        } else { /* RNNprop: m, v EMAs; [m_hat, g] / (sqrt(v_hat) + eps); ELU(linear) */
            float mt[TILE], vt[TILE];
            for (int t = 0; t < TILE; ++t) {
                mt[t] = t < n ? a->m[i0 + t] : 0.0f;
                vt[t] = t < n ? a->v[i0 + t] : 0.0f;
            }
            for (int t = 0; t < TILE; ++t) {
                mt[t] = a->beta1 * mt[t] + (1.0f - a->beta1) * g[t];
                vt[t] = a->beta2 * vt[t] + (1.0f - a->beta2) * g[t] * g[t];
                float d = __builtin_sqrtf(vt[t] * a->inv_bc2) + a->rp_eps;
                x0[t] = mt[t] * a->inv_bc1 / d;
                x1[t] = g[t] / d;
            }
            for (int t = 0; t < n; ++t) {
                a->m[i0 + t] = mt[t];
                a->v[i0 + t] = vt[t];
            }
            const int I = a->in_size;
            for (int r = 0; r < I; ++r) {
                const float wa = a->w_in[2 * r], wb = a->w_in[2 * r + 1], bb = a->b_in[r];
                for (int t = 0; t < TILE; ++t) {
                    const float z = bb + wa * x0[t] + wb * x1[t];
                    const float e = exp_poly(z) - 1.0f; /* computed always: no branch */
                    in[r][t] = z > 0.0f ? z : e;
                }
            }
            k0 = I;
        }

        /* ---- LSTM stack ---- */
        for (int l = 0; l < L; ++l) {
            const int K = l == 0 ? k0 : H;
            float *hs = a->h[l], *cs = a->c[l];
            if (n == TILE) { /* full tile: strided (gather) loads, t innermost to vectorize */
                const float *hb = hs + i0 * H, *cb = cs + i0 * H;
                for (int j = 0; j < H; ++j)
                    for (int t = 0; t < TILE; ++t) {
                        in[K + j][t] = hb[t * H + j];
                        cell[j][t] = cb[t * H + j];
                    }
            } else {
                for (int t = 0; t < TILE; ++t) {
                    if (t < n) {
                        const float *hr = hs + (i0 + t) * H, *cr = cs + (i0 + t) * H;
                        for (int j = 0; j < H; ++j) {
                            in[K + j][t] = hr[j];
                            cell[j][t] = cr[j];
                        }
                    } else {
                        for (int j = 0; j < H; ++j) in[K + j][t] = cell[j][t] = 0.0f;
                    }
                }
            }
#ifndef FLATL2O_PROFILE_SKIP_MATVEC
            matvec_tile(a->w[l], a->b[l], 4 * H, K + H, in, gates);
#else /* benchmarks/cpu_profile.py only: time the step without the gate products */
            for (int r = 0; r < 4 * H; ++r)
                for (int t = 0; t < TILE; ++t) gates[r][t] = in[r % (K + H)][t];
#endif
            for (int j = 0; j < H; ++j) {
                for (int t = 0; t < TILE; ++t) {
                    const float ig = sigmoid_poly(gates[j][t]);
                    const float fg = sigmoid_poly(gates[H + j][t]);
                    const float gg = tanh_poly(gates[2 * H + j][t]);
                    const float og = sigmoid_poly(gates[3 * H + j][t]);
                    const float c = fg * cell[j][t] + ig * gg;
                    cell[j][t] = c;
                    in[j][t] = og * tanh_poly(c); /* next layer's input (and new h) */
                }
            }
            if (n == TILE) {
                float *hb = hs + i0 * H, *cb = cs + i0 * H;
                for (int j = 0; j < H; ++j)
                    for (int t = 0; t < TILE; ++t) {
                        hb[t * H + j] = in[j][t];
                        cb[t * H + j] = cell[j][t];
                    }
            } else {
                for (int t = 0; t < n; ++t) {
                    float *hr = hs + (i0 + t) * H, *cr = cs + (i0 + t) * H;
                    for (int j = 0; j < H; ++j) {
                        hr[j] = in[j][t];
                        cr[j] = cell[j][t];
                    }
                }
            }
        }

        /* ---- read-out ---- */
        for (int t = 0; t < TILE; ++t) out[t] = a->b_out;
        for (int j = 0; j < H; ++j) {
            const float wj = a->w_out[j];
            for (int t = 0; t < TILE; ++t) out[t] += wj * in[j][t];
        }
        if (a->out_tanh)
            for (int t = 0; t < TILE; ++t) out[t] = tanh_poly(out[t]);
        for (int t = 0; t < TILE; ++t) out[t] *= a->scale;

        if (a->param) {
            for (int t = 0; t < n; ++t) a->param[i0 + t] -= a->lr * out[t];
        } else {
            for (int t = 0; t < n; ++t) a->delta[i0 + t] = out[t];
        }
    }
    return 0;
}
