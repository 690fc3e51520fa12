/* flatl2o CPU fast path: one whole learned-rule step per tile of 16 coordinates.
 *
 * Computes exactly the function of flatl2o.rules (L2O-DM, RNNprop and NormProp:
 * preprocessing, stacked LSTM cells, read-out) for each coordinate, but keeps every
 * intermediate of a tile in registers/L1: the gradient and the recurrent state are read once
 * and written once. NormProp's per-tensor normalization takes two calls: flatl2o_step writes
 * each coordinate's direction and per-block sums (normprop_pass), flatl2o_scale_step applies
 * the tensor's step. No allocation, no threads: the Python side splits coordinates across
 * threads (ctypes releases the GIL).
 *
 * Three implementations of the LSTM stack, chosen at compile time:
 *  - AVX-512 (x86 with AVX-512F and DQ, the machines this project benchmarks on): weights are
 *    re-packed by layout.py ("vectors16", flatl2o_layout() == 1) so that one coordinate's gate
 *    pre-activations are whole vectors; gate products are a register-blocked 4-coordinate x
 *    5-vector FMA tile that reads the recurrent state in place (no transposes), and sigmoid /
 *    tanh are 1 / (1 + 2^t) with a degree-5 polynomial 2^f, vscalef and rcp14 plus one Newton
 *    step (no division). See the layout comment above sig2 below.
 *  - AVX2 + FMA (x86 without AVX-512, or -DFLATL2O_NO_AVX512): the same packed layout in
 *    8-float halves, a 1-coordinate register tile (16 ymm registers), the same math.
 *  - portable C (everything else, or -DFLATL2O_PORTABLE): a 16-coordinate tile in column
 *    layout with an 8-row register-blocked matrix-vector product that compilers
 *    auto-vectorize; the nonlinearities use polynomial exp (Cephes, about 1 ulp).
 *
 * Built at first use by flatl2o/kernels/cpu.py with the system C compiler; the reference
 * torch path is used when no compiler is available.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define TILE 16
/* NormProp's per-tensor sums are taken per block of BLOCK coordinates by one fixed pairwise
 * tree (flatl2o.rules.base.REDUCTION_BLOCK, block_partials), so they do not depend on how
 * the coordinates are split across threads or calls */
#define BLOCK 64
#define PREP_DM 0
#define PREP_RNNPROP 1
#define PREP_NORMPROP 2
#define MAX_LAYERS 4
#define MAX_HIDDEN 64
#define MAX_INPUT 64

/* The argument struct of flatl2o_step, declared once, here. ARGS(FIELD, ARRAY) expands to
 * the struct's members and to the table flatl2o_abi_field() exports, from which
 * flatl2o/kernels/cpu.py builds its ctypes mirror at load and checks every offset and the
 * size (flatl2o_args_size) against the compiler's: a library whose layout differs from what
 * the Python side writes is refused, never called. FIELD(type, name, kind) / ARRAY(type,
 * name, kind, count); kind is the ctypes type: 'p' pointer, 'f' float, 'i' int32_t. */
#define ARGS(FIELD, ARRAY)                                                                    \
    /* per-coordinate arrays, already offset to the first coordinate of this call */         \
    FIELD(const float *, grad, 'p')  /* gradient (fp32) */                                    \
    FIELD(float *, param, 'p')       /* fp32 parameter to update in place, or NULL */         \
    FIELD(float *, delta, 'p')       /* where to write the step when param is NULL */         \
    FIELD(float, lr, 'f')            /* param -= lr * step */                                 \
    FIELD(int32_t, negate, 'i')      /* maximize: the rule sees -grad */                      \
                                                                                              \
    FIELD(int32_t, prep, 'i')        /* 0: L2O-DM log/sign, 1: RNNprop, 2: NormProp */        \
    FIELD(float, dm_inv_k, 'f')                                                               \
    FIELD(float, dm_eps, 'f')                                                                 \
    FIELD(float, dm_exp_k, 'f')                                                               \
    FIELD(float *, m, 'p')           /* moving averages (n): RNNprop's m, NormProp's m_fast */ \
    FIELD(float *, m_slow, 'p')      /* NormProp's m_slow */                                  \
    FIELD(float *, v, 'p')                                                                    \
    FIELD(float, beta1, 'f')         /* of m (NormProp: beta_fast) */                         \
    FIELD(float, beta_slow, 'f')                                                              \
    FIELD(float, beta2, 'f')                                                                  \
    /* NormProp: 1 - beta of m, m_slow, v, rounded once from double as in the rule (RNNprop's \
     * kernel takes 1.0f - beta, as it always has: its published results stay bit-exact) */  \
    FIELD(float, one_minus_beta1, 'f')                                                        \
    FIELD(float, one_minus_beta_slow, 'f')                                                    \
    FIELD(float, one_minus_beta2, 'f')                                                        \
    FIELD(float, inv_bc1, 'f')       /* 1 / (1 - beta^step) of m, m_slow, v */                \
    FIELD(float, inv_bc_slow, 'f')                                                            \
    FIELD(float, inv_bc2, 'f')                                                                \
    FIELD(float, rp_eps, 'f')                                                                 \
    FIELD(int32_t, in_size, 'i')     /* ELU input layer width (0: none) */                    \
    FIELD(const float *, w_in, 'p')  /* (in_size, 2) for RNNprop, (in_size, 3) for NormProp */ \
    FIELD(const float *, b_in, 'p')  /* (in_size) */                                          \
    /* NormProp: d = tanh(adam_skip * adam + read-out); its gain head w_gain.h + b_gain     \
     * (w_gain: laid out as w_out); per block of BLOCK coordinates, stats receives the      \
     * sums of d^2, adam^2 and the gain head and the number of counted coordinates */       \
    FIELD(float, adam_skip, 'f')                                                              \
    FIELD(const float *, w_gain, 'p')                                                         \
    FIELD(float, b_gain, 'f')                                                                 \
    FIELD(float *, stats, 'p')                                                                \
                                                                                              \
    FIELD(int32_t, layers, 'i')                                                               \
    FIELD(int32_t, hidden, 'i')                                                               \
    ARRAY(float *, h, 'p', MAX_LAYERS)  /* (n, hidden) row-major */                           \
    ARRAY(float *, c, 'p', MAX_LAYERS)                                                        \
    /* layer weights: the "rows" layout (4*hidden, k_l + hidden) = [W_ih | W_hh], gate order  \
     * i,f,g,o, or the "vectors16" layout of flatl2o_layout() == 1 (flatl2o/kernels/layout.py) \
     */                                                                                       \
    ARRAY(const float *, w, 'p', MAX_LAYERS)                                                  \
    ARRAY(const float *, b, 'p', MAX_LAYERS)  /* (4*hidden): b_ih + b_hh, or packed */        \
    ARRAY(int32_t, k, 'i', MAX_LAYERS)        /* input width of layer l */                    \
                                                                                              \
    FIELD(const float *, w_out, 'p')  /* (hidden), or packed */                               \
    FIELD(float, b_out, 'f')                                                                  \
    FIELD(int32_t, out_tanh, 'i')                                                             \
    FIELD(float, scale, 'f')                                                                  \
    /* 1: m, v, h[l], c[l] hold bfloat16 (uint16) instead of float (packed paths only): rows  \
     * are widened to fp32 per tile, computed as fp32, and rounded (to nearest even) when     \
     * stored, exactly as torch converts them */                                              \
    FIELD(int32_t, state_bf16, 'i')

#define DECLARE_FIELD(type, name, kind) type name;
#define DECLARE_ARRAY(type, name, kind, count) type name[count];
typedef struct {
    ARGS(DECLARE_FIELD, DECLARE_ARRAY)
} flatl2o_args;

typedef struct {
    const char *name;
    int64_t offset, size, count, kind; /* size: of one element */
} abi_field;
#define DESCRIBE_FIELD(type, name, kind) {#name, offsetof(flatl2o_args, name), sizeof(type), 1, kind},
#define DESCRIBE_ARRAY(type, name, kind, count) \
    {#name, offsetof(flatl2o_args, name), sizeof(type), count, kind},
static const abi_field ABI_FIELDS[] = {ARGS(DESCRIBE_FIELD, DESCRIBE_ARRAY)};

/* The argument struct as the compiler laid it out: its size, its number of fields, and
 * field i's name, with (offset, element size, count, kind) written to out. */
int64_t flatl2o_args_size(void) { return (int64_t)sizeof(flatl2o_args); }
int32_t flatl2o_abi_fields(void) { return (int32_t)(sizeof ABI_FIELDS / sizeof ABI_FIELDS[0]); }
const char *flatl2o_abi_field(int32_t i, int64_t out[4]) {
    const abi_field *f = &ABI_FIELDS[i];
    out[0] = f->offset, out[1] = f->size, out[2] = f->count, out[3] = f->kind;
    return f->name;
}

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

/* ELU(z) = z > 0 ? z : e^z - 1 with e^z = 2^n p(f), n = round(z log2(e)), f the rest and p
 * the degree-5 minimax polynomial of 2^f on [-1/2, 1/2] defined below (relative error
 * 7.5e-8; z clamped to [-87, 0] so 2^n is a normal number). Shorter than exp_poly, which
 * RNNprop's input layer keeps (its results stay bit-exact); NormProp's uses this one. */
static inline float elu_poly(float z);

static inline float sigmoid_poly(float x) { return 1.0f / (1.0f + exp_poly(-x)); }
static inline float tanh_poly(float x) { return 1.0f - 2.0f / (1.0f + exp_poly(2.0f * x)); }


/* The rule's network input for the TILE coordinates from i0 (n of them real, the rest zero),
 * in column layout in[j][t]; the moving averages are updated in place, and NormProp's Adam
 * step is written to adam[t]. Returns the input width. */
static inline int prepare_inputs(const flatl2o_args *a, int64_t i0, int n, float in[][TILE],
                                 float adam[TILE]) {
    float g[TILE];
    for (int t = 0; t < TILE; ++t) g[t] = t < n ? a->grad[i0 + t] : 0.0f;
    if (a->negate)
        for (int t = 0; t < TILE; ++t) g[t] = -g[t];
    if (a->prep == PREP_DM) { /* L2O-DM: [clamp(log(|g|+eps)/k, min=-1), clamp(g*e^k, -1, 1)] */
        for (int t = 0; t < TILE; ++t) {
            float l = log_poly((g[t] < 0 ? -g[t] : g[t]) + a->dm_eps) * a->dm_inv_k;
            in[0][t] = l < -1.0f ? -1.0f : l;
            float s = g[t] * a->dm_exp_k;
            s = s < -1.0f ? -1.0f : s;
            in[1][t] = s > 1.0f ? 1.0f : s;
        }
        return 2;
    }
    /* RNNprop: m, v EMAs; [m_hat, g] / (sqrt(v_hat) + eps). NormProp: m_fast, m_slow, v
     * EMAs; [m_fast_hat, m_slow_hat, g] / (sqrt(v_hat) + eps), the first being Adam's step.
     * Then ELU(linear). */
    const int norm = a->prep == PREP_NORMPROP;
    float mt[TILE], st[TILE], vt[TILE], x0[TILE], x1[TILE], x2[TILE];
    for (int t = 0; t < TILE; ++t) {
        mt[t] = t < n ? a->m[i0 + t] : 0.0f;
        vt[t] = t < n ? a->v[i0 + t] : 0.0f;
        st[t] = t < n && norm ? a->m_slow[i0 + t] : 0.0f;
    }
    const float rest1 = norm ? a->one_minus_beta1 : 1.0f - a->beta1;
    const float rest2 = norm ? a->one_minus_beta2 : 1.0f - a->beta2;
    for (int t = 0; t < TILE; ++t) {
        mt[t] = a->beta1 * mt[t] + rest1 * g[t];
        vt[t] = a->beta2 * vt[t] + rest2 * g[t] * g[t];
        float d = __builtin_sqrtf(vt[t] * a->inv_bc2) + a->rp_eps;
        x0[t] = mt[t] * a->inv_bc1 / d;
        if (norm) {
            st[t] = a->beta_slow * st[t] + a->one_minus_beta_slow * g[t];
            x1[t] = st[t] * a->inv_bc_slow / d;
            x2[t] = g[t] / d;
        } else {
            x1[t] = g[t] / d;
        }
    }
    for (int t = 0; t < n; ++t) {
        a->m[i0 + t] = mt[t];
        a->v[i0 + t] = vt[t];
    }
    const int I = a->in_size;
    if (norm) {
        for (int t = 0; t < n; ++t) a->m_slow[i0 + t] = st[t];
        for (int t = 0; t < TILE; ++t) adam[t] = x0[t];
        for (int r = 0; r < I; ++r) {
            const float wa = a->w_in[3 * r], wb = a->w_in[3 * r + 1], wc = a->w_in[3 * r + 2];
            const float bb = a->b_in[r];
            for (int t = 0; t < TILE; ++t) in[r][t] = elu_poly(bb + wa * x0[t] + wb * x1[t] + wc * x2[t]);
        }
        return I;
    }
    for (int r = 0; r < I; ++r) {
        const float wa = a->w_in[2 * r], wb = a->w_in[2 * r + 1], bb = a->b_in[r];
        for (int t = 0; t < TILE; ++t) {
            const float z = bb + wa * x0[t] + wb * x1[t];
            const float e = exp_poly(z) - 1.0f; /* computed always: no branch */
            in[r][t] = z > 0.0f ? z : e;
        }
    }
    return I;
}

/* NormProp's per-coordinate outputs of a tile: Adam's step (from prepare_inputs), then the
 * stats d^2, adam^2 and the gain head w_gain.h + b_gain */
typedef struct {
    float adam[TILE];
    float stats[3][TILE];
} tile_stats;

/* Finish the rule from the read-out pre-activations out[t] and apply the step (NormProp:
 * write its direction d to delta and its stats to ts). */
static inline void write_step(const flatl2o_args *a, int64_t i0, int n, float out[TILE],
                              tile_stats *ts) {
    if (a->prep == PREP_NORMPROP) { /* the direction goes to delta (a->param is NULL) */
        for (int t = 0; t < TILE; ++t) {
            const float adam = ts->adam[t], d = tanh_poly(a->adam_skip * adam + out[t]);
            out[t] = d;
            ts->stats[0][t] = d * d;
            ts->stats[1][t] = adam * adam;
        }
        for (int t = 0; t < n; ++t) a->delta[i0 + t] = out[t];
        return;
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

/* 1 if every float32 of x[0 .. n) is finite. An integer test of the exponent bits: this file
 * is compiled with -ffinite-math-only, under which isfinite() may be folded to 1. Called by
 * the optimizer's NaN/inf check instead of a torch op, which would wake torch's OpenMP
 * workers and leave one spinning on the core the kernel's second thread needs. */
int flatl2o_all_finite_f32(const uint32_t *x, int64_t n) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; ++i) bad |= (x[i] & 0x7f800000u) == 0x7f800000u;
    return !bad;
}

static inline int unsupported(const flatl2o_args *a) {
    if (a->hidden > MAX_HIDDEN || a->layers > MAX_LAYERS || a->in_size > MAX_INPUT) return 1;
    for (int l = 0; l < a->layers; ++l)
        if (a->k[l] > MAX_INPUT) return 1;
    return 0;
}

static inline float bf16_to_f32(uint16_t x) {
    fbits u;
    u.i = (int32_t)((uint32_t)x << 16);
    return u.f;
}

/* float -> bfloat16, rounding to nearest even like torch (NaN stays a quiet NaN) */
static inline uint16_t f32_to_bf16(float f) {
    fbits u;
    u.f = f;
    const uint32_t b = (uint32_t)u.i;
    const uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
    const uint32_t nan = (b >> 16) | 0x40u;
    return (uint16_t)((b & 0x7fffffffu) > 0x7f800000u ? nan : rounded); /* a select: vectorizes */
}

/* n rows of `width` state values from i0, widened to fp32 (zero past n) */
static void load_rows(const flatl2o_args *a, const void *src, int64_t i0, int n, int width,
                      float *dst) {
    memset(dst + (size_t)n * width, 0, (size_t)(TILE - n) * width * sizeof(float));
    if (a->state_bf16) {
        const uint16_t *p = (const uint16_t *)src + i0 * width;
        for (int64_t k = 0; k < (int64_t)n * width; ++k) dst[k] = bf16_to_f32(p[k]);
    } else {
        memcpy(dst, (const float *)src + i0 * width, (size_t)n * width * sizeof(float));
    }
}

static void store_rows(const flatl2o_args *a, void *dst, int64_t i0, int n, int width,
                       const float *src) {
    if (a->state_bf16) {
        uint16_t *p = (uint16_t *)dst + i0 * width;
        for (int64_t k = 0; k < (int64_t)n * width; ++k) p[k] = f32_to_bf16(src[k]);
    } else {
        memcpy((float *)dst + i0 * width, src, (size_t)n * width * sizeof(float));
    }
}

/* The step for the n <= TILE coordinates from i0 on fp32 copies of their rows (zero past n),
 * computed by core(copy, n): the last partial tile of the packed paths, and every tile of a
 * bf16 state. */
static void scratch_tile(const flatl2o_args *a, int64_t i0, int n, tile_stats *ts,
                         void (*core)(const flatl2o_args *, int, tile_stats *)) {
    const int H = a->hidden, L = a->layers;
    float grad[TILE] = {0}, param[TILE] = {0}, m[TILE], m_slow[TILE], v[TILE];
    float hs[MAX_LAYERS][TILE * MAX_HIDDEN], cs[MAX_LAYERS][TILE * MAX_HIDDEN];
    flatl2o_args s = *a;
    memcpy(grad, a->grad + i0, n * sizeof(float));
    s.grad = grad;
    if (a->param) {
        memcpy(param, a->param + i0, n * sizeof(float));
        s.param = param;
    } else {
        s.delta = param;
    }
    if (a->prep != PREP_DM) {
        load_rows(a, a->m, i0, n, 1, m);
        load_rows(a, a->v, i0, n, 1, v);
        s.m = m;
        s.v = v;
        if (a->prep == PREP_NORMPROP) {
            load_rows(a, a->m_slow, i0, n, 1, m_slow);
            s.m_slow = m_slow;
        }
    }
    for (int l = 0; l < L; ++l) {
        load_rows(a, a->h[l], i0, n, H, hs[l]);
        load_rows(a, a->c[l], i0, n, H, cs[l]);
        s.h[l] = hs[l];
        s.c[l] = cs[l];
    }
    s.state_bf16 = 0;
    core(&s, n, ts);
    memcpy(a->param ? a->param + i0 : a->delta + i0, param, n * sizeof(float));
    if (a->prep != PREP_DM) {
        store_rows(a, a->m, i0, n, 1, m);
        store_rows(a, a->v, i0, n, 1, v);
        if (a->prep == PREP_NORMPROP) store_rows(a, a->m_slow, i0, n, 1, m_slow);
    }
    for (int l = 0; l < L; ++l) {
        store_rows(a, a->h[l], i0, n, H, hs[l]);
        store_rows(a, a->c[l], i0, n, H, cs[l]);
    }
}

/* 1 if the `count` state values from index `off` are all exactly +0.0 (bits all zero: the
 * initial state). An integer test: this file is compiled with -ffinite-math-only. */
static inline int zero_bits(const flatl2o_args *a, const void *p, int64_t off, int count) {
    uint32_t any = 0;
    if (a->state_bf16) {
        const uint16_t *q = (const uint16_t *)p + off;
        for (int k = 0; k < count; ++k) any |= q[k];
    } else {
        const uint32_t *q = (const uint32_t *)p + off;
        for (int k = 0; k < count; ++k) any |= q[k];
    }
    return any == 0;
}

/* The zero-gradient contract (flatl2o.kernels.reference.untouched): bit t is set when
 * coordinate i0 + t has a gradient of exactly 0 (either sign) and all of its state exactly
 * +0.0. Such a coordinate is left as it is (parameter and state), so a coordinate whose
 * gradient has been 0 at every step so far never moves. The state is read only for zero
 * gradients. */
static uint32_t untouched_mask(const flatl2o_args *a, int64_t i0, int n) {
    uint32_t mask = 0;
    for (int t = 0; t < n; ++t) {
        fbits u;
        u.f = a->grad[i0 + t];
        mask |= (uint32_t)((u.i & 0x7fffffff) == 0) << t;
    }
    const int H = a->hidden;
    for (int t = 0; t < n && mask; ++t) {
        if (!(mask >> t & 1u)) continue;
        const int64_t i = i0 + t;
        int zero = a->prep == PREP_DM || (zero_bits(a, a->m, i, 1) && zero_bits(a, a->v, i, 1));
        if (zero && a->prep == PREP_NORMPROP) zero = zero_bits(a, a->m_slow, i, 1);
        for (int l = 0; l < a->layers && zero; ++l)
            zero = zero_bits(a, a->h[l], i * H, H) && zero_bits(a, a->c[l], i * H, H);
        if (!zero) mask &= ~(1u << t);
    }
    return mask;
}

/* Undo the step for the coordinates of `mask`: their parameter from `saved` (or a zero
 * delta) and their state back to +0.0, which it was (see untouched_mask). */
static void leave_untouched(const flatl2o_args *a, int64_t i0, int n, uint32_t mask,
                            const float saved[TILE]) {
    const int H = a->hidden;
    const size_t size = a->state_bf16 ? 2 : 4;
    for (int t = 0; t < n; ++t) {
        if (!(mask >> t & 1u)) continue;
        const int64_t i = i0 + t;
        if (a->param)
            a->param[i] = saved[t];
        else
            a->delta[i] = 0.0f;
        if (a->prep != PREP_DM) {
            memset((char *)a->m + i * size, 0, size);
            memset((char *)a->v + i * size, 0, size);
        }
        if (a->prep == PREP_NORMPROP) memset((char *)a->m_slow + i * size, 0, size);
        for (int l = 0; l < a->layers; ++l) {
            memset((char *)a->h[l] + i * H * size, 0, H * size);
            memset((char *)a->c[l] + i * H * size, 0, H * size);
        }
    }
}

/* 2^f on [-1/2, 1/2]: degree-5 minimax polynomial (relative error 7.5e-8), shared by the
 * AVX-512 and AVX2 paths and elu_poly (Horner from the highest coefficient) */
#define EXP2_C5 1.3276472454890609e-3f
#define EXP2_C4 9.675541892647743e-3f
#define EXP2_C3 5.550713092088699e-2f
#define EXP2_C2 2.4022120237350464e-1f
#define EXP2_C1 6.931469440460205e-1f
#define EXP2_C0 1.0000001192092896f
#define LOG2E 1.44269504088896341f

static inline float elu_poly(float z) {
    float t = (z < 0.0f ? z : 0.0f) * LOG2E;
    t = t < -125.0f ? -125.0f : t;
    const float n = __builtin_rintf(t), f = t - n;
    float p = EXP2_C5;
    p = p * f + EXP2_C4;
    p = p * f + EXP2_C3;
    p = p * f + EXP2_C2;
    p = p * f + EXP2_C1;
    p = p * f + EXP2_C0;
    fbits e;
    e.i = ((int32_t)n + 127) << 23;
    const float em1 = p * e.f - 1.0f; /* computed always: no branch */
    return z > 0.0f ? z : em1;
}

#if defined(__AVX512F__) && defined(__AVX512DQ__) && !defined(FLATL2O_PORTABLE) && \
    !defined(FLATL2O_NO_AVX512)
#define FLATL2O_PACKED_PATH 1
#include <immintrin.h>

/* Packed layout ("vectors16", built by flatl2o/kernels/layout.py: pack). With H hidden units,
 * A = H / 16 full blocks and Q = ceil((H % 16) / 4) tail quads, one coordinate's 4H gate
 * pre-activations are NV = 4A + Q vectors of 16:
 *   vector 4b + g (g = i, f, g, o): gate g of units 16b .. 16b+15;
 *   vector 4A + s: lanes 4g + u hold gate g of unit 16A + 4s + u (zero past H).
 * Full blocks then need no shuffles; the tail quads of 4 coordinates are transposed into
 * whole vectors. Weights w[l] are (k_l + H, NV, 16): for each input j, its NV column
 * vectors; b[l] is (NV, 16). Rows are pre-multiplied by -log2(e) (sigmoid gates) or
 * -2 log2(e) (the tanh gate), so every gate is 1 / (1 + 2^t) of its packed pre-activation.
 * w_out is (16A + 16Q): the full blocks' read-out weights, then each tail quad's four
 * weights repeated four times (one copy per coordinate of a 4-coordinate block). */
#define CB 4   /* coordinates per register block of the gate products */
#define NVG 5  /* gate vectors per register block: CB * NVG = 20 accumulators */
#define MAX_NV (MAX_HIDDEN / 4)

/* 1 / (1 + 2^t), to a few float32 ulp, for any t (+-inf included): 2^t = 2^round(t) *
 * p(t - round(t)) with a degree-5 minimax polynomial (relative error 7.5e-8 on [-1/2, 1/2];
 * degree 6 measured 4% slower for no visible change), and the reciprocal by rcp14 + one
 * Newton step (a division costs more). 2^round(t) is clamped at 2^100 (results under 2^-100
 * round to that). */
static inline __m512 sig2(__m512 t) {
    const __m512 one = _mm512_set1_ps(1.0f);
    /* f = t - round(t) in one instruction (vreduceps, exact; 0 for t = +-inf, so a saturated
     * gate or an absurd state value gives 0 or 1, not NaN), and round(t) = t - f exactly */
    const __m512 f = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 n = _mm512_sub_ps(t, f);
    __m512 p = _mm512_set1_ps(EXP2_C5);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(EXP2_C0));
    /* the clamp (so 2^n stays finite) is off the polynomial's critical path */
    const __m512 d =
        _mm512_add_ps(_mm512_scalef_ps(p, _mm512_min_ps(n, _mm512_set1_ps(100.0f))), one);
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, one), r);
}

/* tanh(c) = 2 / (1 + e^(-2c)) - 1 */
static inline __m512 tanh2(__m512 c) {
    const __m512 s = sig2(_mm512_mul_ps(c, _mm512_set1_ps(-2.0f * LOG2E)));
    return _mm512_fmsub_ps(_mm512_set1_ps(2.0f), s, _mm512_set1_ps(1.0f));
}

/* G[t][V0 + v] = b + sum_j W[j][V0 + v] * [x_t ; h_t][j] for CB coordinates t and NV_
 * vectors v: CB * NV_ accumulators stay in registers; each weight vector load feeds CB FMAs
 * and each input is one broadcast load straight from the state (or input) row. */
static inline __attribute__((always_inline)) void gate_tile(
    const float *restrict W, const float *restrict bias, int nv, int V0, const int NV_, int K,
    int H, const float *const x[CB], int xs, const float *const h[CB], float *restrict G) {
    __m512 acc[CB][NVG];
    for (int v = 0; v < NV_; ++v) {
        const __m512 b = _mm512_loadu_ps(bias + (V0 + v) * 16);
        for (int t = 0; t < CB; ++t) acc[t][v] = b;
    }
    const float *w = W + V0 * 16;
    const int stride = nv * 16;
    for (int j = 0; j < K; ++j, w += stride) {
        __m512 xb[CB];
        for (int t = 0; t < CB; ++t) xb[t] = _mm512_set1_ps(x[t][j * xs]);
        for (int v = 0; v < NV_; ++v) {
            const __m512 wv = _mm512_loadu_ps(w + v * 16);
            for (int t = 0; t < CB; ++t) acc[t][v] = _mm512_fmadd_ps(wv, xb[t], acc[t][v]);
        }
    }
    for (int j = 0; j < H; ++j, w += stride) {
        __m512 hb[CB];
        for (int t = 0; t < CB; ++t) hb[t] = _mm512_set1_ps(h[t][j]);
        for (int v = 0; v < NV_; ++v) {
            const __m512 wv = _mm512_loadu_ps(w + v * 16);
            for (int t = 0; t < CB; ++t) acc[t][v] = _mm512_fmadd_ps(wv, hb[t], acc[t][v]);
        }
    }
    for (int t = 0; t < CB; ++t)
        for (int v = 0; v < NV_; ++v) _mm512_storeu_ps(G + (t * nv + V0 + v) * 16, acc[t][v]);
}

/* All NV gate vectors of CB coordinates, in register blocks of at most NVG vectors. */
static void gate_products(const float *W, const float *bias, int nv, int K, int H,
                          const float *const x[CB], int xs, const float *const h[CB],
                          float *G) {
    const int groups = (nv + NVG - 1) / NVG;
    for (int g = 0; g < groups; ++g) {
        const int v0 = g * nv / groups, v1 = (g + 1) * nv / groups;
        switch (v1 - v0) {
        case 5: gate_tile(W, bias, nv, v0, 5, K, H, x, xs, h, G); break;
        case 4: gate_tile(W, bias, nv, v0, 4, K, H, x, xs, h, G); break;
        case 3: gate_tile(W, bias, nv, v0, 3, K, H, x, xs, h, G); break;
        case 2: gate_tile(W, bias, nv, v0, 2, K, H, x, xs, h, G); break;
        default: gate_tile(W, bias, nv, v0, 1, K, H, x, xs, h, G); break;
        }
    }
}

/* out[t] = the sum of the 16 lanes of r[t] and of the 4 lanes of quarter t of tail, t < CB:
 * four horizontal sums at once, folding quarters, then lanes within each quarter. */
static inline void readout_sums(const __m512 r[CB], __m512 tail, float *out) {
    const __m512 p01 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], 0x44),
                                     _mm512_shuffle_f32x4(r[0], r[1], 0xEE));
    const __m512 p23 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], 0x44),
                                     _mm512_shuffle_f32x4(r[2], r[3], 0xEE));
    __m512 z = _mm512_add_ps(_mm512_shuffle_f32x4(p01, p23, 0x88),
                             _mm512_shuffle_f32x4(p01, p23, 0xDD));
    z = _mm512_add_ps(z, tail);
    z = _mm512_add_ps(z, _mm512_permute_ps(z, 0x4E));
    z = _mm512_add_ps(z, _mm512_permute_ps(z, 0xB1));
    const __m512i idx = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 12, 8, 4, 0);
    _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, z)));
}

/* One LSTM layer for CB coordinates: gates, cell and hidden state written in place, and
 * (last layer) the read-out pre-activations out[0 .. CB) without the bias, and NormProp's
 * gain head gout[0 .. CB) likewise (w_gain packed as w_out; gout NULL: none). */
static void lstm_block(const flatl2o_args *a, int l, int K, const float *const x[CB], int xs,
                       float *const h[CB], float *const c[CB], float *out, float *gout) {
    const int H = a->hidden, A = H / 16, Q = (H % 16 + 3) / 4, nv = 4 * A + Q;
    float G[CB * MAX_NV * 16] __attribute__((aligned(64)));
    gate_products(a->w[l], a->b[l], nv, K, H, x, xs, (const float *const *)h, G);
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f);
    const float *wo = a->w_out, *wg = a->w_gain;
    __m512 ro[CB], go[CB];
    for (int t = 0; t < CB; ++t) ro[t] = go[t] = _mm512_setzero_ps();
    for (int b = 0; b < A; ++b) {
        /* the CB coordinates side by side: 4 CB independent gate sigmoids, then CB
         * independent tanh(c) chains, so the long exp/reciprocal latencies overlap */
        __m512 cn[CB], og[CB];
        for (int t = 0; t < CB; ++t) {
            const float *gt = G + (t * nv + 4 * b) * 16;
            const __m512 ig = sig2(_mm512_load_ps(gt));
            const __m512 fg = sig2(_mm512_load_ps(gt + 16));
            const __m512 gg = _mm512_fmsub_ps(two, sig2(_mm512_load_ps(gt + 32)), one);
            og[t] = sig2(_mm512_load_ps(gt + 48));
            cn[t] = _mm512_fmadd_ps(fg, _mm512_loadu_ps(c[t] + 16 * b), _mm512_mul_ps(ig, gg));
            _mm512_storeu_ps(c[t] + 16 * b, cn[t]);
        }
        for (int t = 0; t < CB; ++t) {
            const __m512 hn = _mm512_mul_ps(og[t], tanh2(cn[t]));
            _mm512_storeu_ps(h[t] + 16 * b, hn);
            if (out) ro[t] = _mm512_fmadd_ps(_mm512_loadu_ps(wo + 16 * b), hn, ro[t]);
            if (gout) go[t] = _mm512_fmadd_ps(_mm512_loadu_ps(wg + 16 * b), hn, go[t]);
        }
    }
    __m512 tail_ro = _mm512_setzero_ps(), tail_go = _mm512_setzero_ps();
    if (Q) {
        /* lanes 8..11 of a tail vector are the tanh gate: 2 s - 1 there, s elsewhere */
        static const float mul[16] __attribute__((aligned(64))) = {1, 1, 1, 1, 1, 1, 1, 1,
                                                                   2, 2, 2, 2, 1, 1, 1, 1};
        static const float add[16] __attribute__((aligned(64))) = {0, 0, 0, 0,  0,  0,  0,  0,
                                                                   -1, -1, -1, -1, 0, 0, 0, 0};
        const __m512 am = _mm512_load_ps(mul), aa = _mm512_load_ps(add);
        for (int s = 0; s < Q; ++s) {
            const int u0 = 16 * A + 4 * s;
            const __mmask8 m = (__mmask8)((1u << (H - u0 < 4 ? H - u0 : 4)) - 1u);
            __m512 q[CB];
            for (int t = 0; t < CB; ++t)
                q[t] = _mm512_fmadd_ps(sig2(_mm512_load_ps(G + (t * nv + 4 * A + s) * 16)), am,
                                       aa);
            /* 4x4 transpose of 128-bit quarters: quarter t of I/F/Gg/O is coordinate t */
            const __m512 t0 = _mm512_shuffle_f32x4(q[0], q[1], 0x44); /* i0 f0 i1 f1 */
            const __m512 t1 = _mm512_shuffle_f32x4(q[0], q[1], 0xEE); /* g0 o0 g1 o1 */
            const __m512 t2 = _mm512_shuffle_f32x4(q[2], q[3], 0x44);
            const __m512 t3 = _mm512_shuffle_f32x4(q[2], q[3], 0xEE);
            const __m512 ig = _mm512_shuffle_f32x4(t0, t2, 0x88);
            const __m512 fg = _mm512_shuffle_f32x4(t0, t2, 0xDD);
            const __m512 gg = _mm512_shuffle_f32x4(t1, t3, 0x88);
            const __m512 og = _mm512_shuffle_f32x4(t1, t3, 0xDD);
            __m512 co = _mm512_castps128_ps512(_mm_maskz_loadu_ps(m, c[0] + u0));
            co = _mm512_insertf32x4(co, _mm_maskz_loadu_ps(m, c[1] + u0), 1);
            co = _mm512_insertf32x4(co, _mm_maskz_loadu_ps(m, c[2] + u0), 2);
            co = _mm512_insertf32x4(co, _mm_maskz_loadu_ps(m, c[3] + u0), 3);
            const __m512 cn = _mm512_fmadd_ps(fg, co, _mm512_mul_ps(ig, gg));
            const __m512 hn = _mm512_mul_ps(og, tanh2(cn));
            _mm_mask_storeu_ps(c[0] + u0, m, _mm512_castps512_ps128(cn));
            _mm_mask_storeu_ps(c[1] + u0, m, _mm512_extractf32x4_ps(cn, 1));
            _mm_mask_storeu_ps(c[2] + u0, m, _mm512_extractf32x4_ps(cn, 2));
            _mm_mask_storeu_ps(c[3] + u0, m, _mm512_extractf32x4_ps(cn, 3));
            _mm_mask_storeu_ps(h[0] + u0, m, _mm512_castps512_ps128(hn));
            _mm_mask_storeu_ps(h[1] + u0, m, _mm512_extractf32x4_ps(hn, 1));
            _mm_mask_storeu_ps(h[2] + u0, m, _mm512_extractf32x4_ps(hn, 2));
            _mm_mask_storeu_ps(h[3] + u0, m, _mm512_extractf32x4_ps(hn, 3));
            if (out) tail_ro = _mm512_fmadd_ps(_mm512_loadu_ps(wo + 16 * (A + s)), hn, tail_ro);
            if (gout) tail_go = _mm512_fmadd_ps(_mm512_loadu_ps(wg + 16 * (A + s)), hn, tail_go);
        }
    }
    if (out) readout_sums(ro, tail_ro, out);
    if (gout) readout_sums(go, tail_go, gout);
}

#elif defined(__AVX2__) && defined(__FMA__) && !defined(FLATL2O_PORTABLE)
#define FLATL2O_PACKED_PATH 1
#include <immintrin.h>

/* AVX2 + FMA (x86 without AVX-512): the same packed layout as the AVX-512 path, each
 * 16-float vector handled as two 8-float halves ("ymm" below): gate vector v of the layout
 * is ymm 2v (lanes 0-7) and 2v + 1 (lanes 8-15), so a tail quad is [i i i i f f f f] and
 * [g g g g o o o o], transposed two coordinates at a time. Only 16 ymm registers: the gate
 * products are a 1-coordinate x up-to-12-ymm register tile (each weight load feeds one FMA,
 * within the two or three loads per cycle these cores have). */
#define CB 2    /* coordinates per elementwise block (the tail transposes pair them) */
#define NYG 12  /* ymm accumulators per register block */
#define MAX_NY (2 * MAX_HIDDEN / 4)

/* 1 / (1 + 2^t), to a few float32 ulp: t clamped to [-126, 126] (NaN kept), 2^t =
 * 2^round(t) * p(t - round(t)) with the AVX-512 path's degree-5 polynomial and the power
 * of two built in the exponent bits, then the reciprocal by rcp (12 bits) + one Newton step. */
static inline __m256 sig2(__m256 t) {
    const __m256 one = _mm256_set1_ps(1.0f);
    t = _mm256_min_ps(_mm256_set1_ps(126.0f), t); /* NaN is the second operand: kept */
    t = _mm256_max_ps(_mm256_set1_ps(-126.0f), t);
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(EXP2_C5);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(EXP2_C0));
    const __m256i e = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23); /* 2^n */
    const __m256 d = _mm256_fmadd_ps(p, _mm256_castsi256_ps(e), one);
    const __m256 r = _mm256_rcp_ps(d);
    return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(d, r, one), r);
}

static inline __m256 tanh2(__m256 c) {
    const __m256 s = sig2(_mm256_mul_ps(c, _mm256_set1_ps(-2.0f * LOG2E)));
    return _mm256_fmsub_ps(_mm256_set1_ps(2.0f), s, _mm256_set1_ps(1.0f));
}

/* G[Y0 + v] = b + sum_j W[j][Y0 + v] * [x ; h][j] for one coordinate, NY_ ymm at once. */
static inline __attribute__((always_inline)) void gate_tile(
    const float *restrict W, const float *restrict bias, int ny, int Y0, const int NY_, int K,
    int H, const float *x, int xs, const float *h, __m256 G[MAX_NY]) {
    __m256 acc[NYG];
    for (int v = 0; v < NY_; ++v) acc[v] = _mm256_loadu_ps(bias + (Y0 + v) * 8);
    const float *w = W + Y0 * 8;
    const int stride = ny * 8;
    for (int j = 0; j < K; ++j, w += stride) {
        const __m256 xb = _mm256_set1_ps(x[j * xs]);
        for (int v = 0; v < NY_; ++v)
            acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(w + v * 8), xb, acc[v]);
    }
    for (int j = 0; j < H; ++j, w += stride) {
        const __m256 hb = _mm256_set1_ps(h[j]);
        for (int v = 0; v < NY_; ++v)
            acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(w + v * 8), hb, acc[v]);
    }
    for (int v = 0; v < NY_; ++v) G[Y0 + v] = acc[v];
}

/* All 2 NV gate halves of one coordinate, in register blocks of at most NYG. */
static void gate_products(const float *W, const float *bias, int ny, int K, int H,
                          const float *x, int xs, const float *h, __m256 G[MAX_NY]) {
    const int groups = (ny + NYG - 1) / NYG;
    for (int g = 0; g < groups; ++g) {
        const int v0 = g * ny / groups, v1 = (g + 1) * ny / groups;
        switch (v1 - v0) {
        case 12: gate_tile(W, bias, ny, v0, 12, K, H, x, xs, h, G); break;
        case 11: gate_tile(W, bias, ny, v0, 11, K, H, x, xs, h, G); break;
        case 10: gate_tile(W, bias, ny, v0, 10, K, H, x, xs, h, G); break;
        case 9: gate_tile(W, bias, ny, v0, 9, K, H, x, xs, h, G); break;
        case 8: gate_tile(W, bias, ny, v0, 8, K, H, x, xs, h, G); break;
        case 7: gate_tile(W, bias, ny, v0, 7, K, H, x, xs, h, G); break;
        case 6: gate_tile(W, bias, ny, v0, 6, K, H, x, xs, h, G); break;
        case 5: gate_tile(W, bias, ny, v0, 5, K, H, x, xs, h, G); break;
        case 4: gate_tile(W, bias, ny, v0, 4, K, H, x, xs, h, G); break;
        case 3: gate_tile(W, bias, ny, v0, 3, K, H, x, xs, h, G); break;
        default: gate_tile(W, bias, ny, v0, 2, K, H, x, xs, h, G); break; /* ny is even */
        }
    }
}

static inline float hsum4(__m128 v) {
    v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    v = _mm_add_ss(v, _mm_movehdup_ps(v));
    return _mm_cvtss_f32(v);
}

/* out[t] = the sum of the 8 lanes of r[t] and of the 4 lanes of half t of tail, t < CB */
static inline void readout_sums(const __m256 r[CB], __m256 tail, float *out) {
    const __m128 halves[CB] = {_mm256_castps256_ps128(tail), _mm256_extractf128_ps(tail, 1)};
    for (int t = 0; t < CB; ++t) {
        const __m128 s = _mm_add_ps(_mm256_castps256_ps128(r[t]), _mm256_extractf128_ps(r[t], 1));
        out[t] = hsum4(_mm_add_ps(s, halves[t]));
    }
}

/* One LSTM layer for CB coordinates (see the AVX-512 lstm_block). */
static void lstm_block(const flatl2o_args *a, int l, int K, const float *const x[CB], int xs,
                       float *const h[CB], float *const c[CB], float *out, float *gout) {
    const int H = a->hidden, A = H / 16, Q = (H % 16 + 3) / 4, ny = 2 * (4 * A + Q);
    __m256 G[CB][MAX_NY];
    for (int t = 0; t < CB; ++t) gate_products(a->w[l], a->b[l], ny, K, H, x[t], xs, h[t], G[t]);
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    const float *wo = a->w_out, *wg = a->w_gain;
    __m256 ro[CB], go[CB];
    for (int t = 0; t < CB; ++t) ro[t] = go[t] = _mm256_setzero_ps();
    for (int b = 0; b < A; ++b) {
        for (int half = 0; half < 2; ++half) {
            const int u = 16 * b + 8 * half, y = 8 * b + half; /* ymm of gate i; +2 per gate */
            __m256 cn[CB], og[CB];
            for (int t = 0; t < CB; ++t) {
                const __m256 ig = sig2(G[t][y]);
                const __m256 fg = sig2(G[t][y + 2]);
                const __m256 gg = _mm256_fmsub_ps(two, sig2(G[t][y + 4]), one);
                og[t] = sig2(G[t][y + 6]);
                cn[t] = _mm256_fmadd_ps(fg, _mm256_loadu_ps(c[t] + u), _mm256_mul_ps(ig, gg));
                _mm256_storeu_ps(c[t] + u, cn[t]);
            }
            for (int t = 0; t < CB; ++t) {
                const __m256 hn = _mm256_mul_ps(og[t], tanh2(cn[t]));
                _mm256_storeu_ps(h[t] + u, hn);
                if (out) ro[t] = _mm256_fmadd_ps(_mm256_loadu_ps(wo + u), hn, ro[t]);
                if (gout) go[t] = _mm256_fmadd_ps(_mm256_loadu_ps(wg + u), hn, go[t]);
            }
        }
    }
    __m256 tail_ro = _mm256_setzero_ps(), tail_go = _mm256_setzero_ps();
    if (Q) {
        /* lanes 0..3 of a tail quad's upper half are the tanh gate: 2 s - 1 there */
        const __m256 am = _mm256_setr_ps(2, 2, 2, 2, 1, 1, 1, 1);
        const __m256 aa = _mm256_setr_ps(-1, -1, -1, -1, 0, 0, 0, 0);
        for (int s = 0; s < Q; ++s) {
            const int u0 = 16 * A + 4 * s, y = 8 * A + 2 * s;
            const int valid = H - u0 < 4 ? H - u0 : 4;
            const __m128i m = _mm_cmpgt_epi32(_mm_set1_epi32(valid), _mm_setr_epi32(0, 1, 2, 3));
            const __m256 lo0 = sig2(G[0][y]), lo1 = sig2(G[1][y]); /* [i i i i f f f f] */
            const __m256 hi0 = _mm256_fmadd_ps(sig2(G[0][y + 1]), am, aa); /* [g.. o..] */
            const __m256 hi1 = _mm256_fmadd_ps(sig2(G[1][y + 1]), am, aa);
            const __m256 ig = _mm256_permute2f128_ps(lo0, lo1, 0x20); /* coordinate 0 | 1 */
            const __m256 fg = _mm256_permute2f128_ps(lo0, lo1, 0x31);
            const __m256 gg = _mm256_permute2f128_ps(hi0, hi1, 0x20);
            const __m256 og = _mm256_permute2f128_ps(hi0, hi1, 0x31);
            const __m256 co = _mm256_insertf128_ps(
                _mm256_castps128_ps256(_mm_maskload_ps(c[0] + u0, m)),
                _mm_maskload_ps(c[1] + u0, m), 1);
            const __m256 cn = _mm256_fmadd_ps(fg, co, _mm256_mul_ps(ig, gg));
            const __m256 hn = _mm256_mul_ps(og, tanh2(cn));
            _mm_maskstore_ps(c[0] + u0, m, _mm256_castps256_ps128(cn));
            _mm_maskstore_ps(c[1] + u0, m, _mm256_extractf128_ps(cn, 1));
            _mm_maskstore_ps(h[0] + u0, m, _mm256_castps256_ps128(hn));
            _mm_maskstore_ps(h[1] + u0, m, _mm256_extractf128_ps(hn, 1));
            if (out) tail_ro = _mm256_fmadd_ps(_mm256_loadu_ps(wo + 16 * (A + s)), hn, tail_ro);
            if (gout) tail_go = _mm256_fmadd_ps(_mm256_loadu_ps(wg + 16 * (A + s)), hn, tail_go);
        }
    }
    if (out) readout_sums(ro, tail_ro, out);
    if (gout) readout_sums(go, tail_go, gout);
}
#endif

#ifdef FLATL2O_PACKED_PATH
/* The whole step for the TILE coordinates from i0 (all of them real). */
static void full_tile(const flatl2o_args *a, int64_t i0, tile_stats *ts) {
    const int H = a->hidden, L = a->layers;
    float in[MAX_INPUT][TILE] __attribute__((aligned(64)));
    float out[TILE] __attribute__((aligned(64)));
    const int k0 = prepare_inputs(a, i0, TILE, in, ts->adam);
    /* layer by layer: a block's cell updates (long exp/reciprocal chains) are then followed
     * by the next block's independent gate products, which fill the FMA ports meanwhile */
    for (int l = 0; l < L; ++l) {
        for (int t0 = 0; t0 < TILE; t0 += CB) {
            const float *x[CB];
            float *h[CB], *c[CB];
            for (int t = 0; t < CB; ++t) {
                const int64_t row = (i0 + t0 + t) * H;
                x[t] = l == 0 ? &in[0][t0 + t] : a->h[l - 1] + row;
                h[t] = a->h[l] + row;
                c[t] = a->c[l] + row;
            }
            const int last = l == L - 1;
            lstm_block(a, l, l == 0 ? k0 : H, x, l == 0 ? TILE : 1, h, c, last ? out + t0 : NULL,
                       last && a->prep == PREP_NORMPROP ? ts->stats[2] + t0 : NULL);
        }
    }
    for (int t = 0; t < TILE; ++t) out[t] += a->b_out;
    if (a->prep == PREP_NORMPROP)
        for (int t = 0; t < TILE; ++t) ts->stats[2][t] += a->b_gain;
    write_step(a, i0, TILE, out, ts);
}

static void packed_core(const flatl2o_args *s, int n, tile_stats *ts) {
    (void)n; /* the rows past n are zero */
    full_tile(s, 0, ts);
}

/* The step for the n <= TILE coordinates from i0: whole fp32 tiles in place, the rest (a
 * last partial tile, every tile of a bf16 state) on fp32 copies. */
static void one_tile(const flatl2o_args *a, int64_t i0, int n, tile_stats *ts) {
    if (n == TILE && !a->state_bf16)
        full_tile(a, i0, ts);
    else
        scratch_tile(a, i0, n, ts, packed_core);
}

int flatl2o_layout(void) { return 1; }

#else /* portable C */

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

/* The fp32 step for the n <= TILE coordinates from i0 (a partial tile handled in place). */
static void portable_tile(const flatl2o_args *a, int64_t i0, int n, tile_stats *ts) {
    const int H = a->hidden, L = a->layers;

    float in[MAX_INPUT + MAX_HIDDEN][TILE]; /* [x ; h] of the current layer */
    float gates[4 * MAX_HIDDEN][TILE];
    float cell[MAX_HIDDEN][TILE];
    float out[TILE];

    const int k0 = prepare_inputs(a, i0, n, in, ts->adam);

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
        matvec_tile(a->w[l], a->b[l], 4 * H, K + H, in, gates);
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

    /* ---- read-out (and NormProp's gain head) ---- */
    for (int t = 0; t < TILE; ++t) out[t] = a->b_out;
    for (int j = 0; j < H; ++j) {
        const float wj = a->w_out[j];
        for (int t = 0; t < TILE; ++t) out[t] += wj * in[j][t];
    }
    if (a->prep == PREP_NORMPROP) {
        float *gain = ts->stats[2];
        for (int t = 0; t < TILE; ++t) gain[t] = a->b_gain;
        for (int j = 0; j < H; ++j) {
            const float wj = a->w_gain[j];
            for (int t = 0; t < TILE; ++t) gain[t] += wj * in[j][t];
        }
    }
    write_step(a, i0, n, out, ts);
}

static void portable_core(const flatl2o_args *s, int n, tile_stats *ts) {
    portable_tile(s, 0, n, ts);
}

/* The step for the n <= TILE coordinates from i0 (a bf16 state on fp32 copies). */
static void one_tile(const flatl2o_args *a, int64_t i0, int n, tile_stats *ts) {
    if (!a->state_bf16)
        portable_tile(a, i0, n, ts);
    else
        scratch_tile(a, i0, n, ts, portable_core);
}

int flatl2o_layout(void) { return 0; }
#endif

/* x[0] + ... + x[BLOCK - 1] by flatl2o.rules.base.block_partials's pairwise tree (x is
 * overwritten): x[i] += x[i + half] for half = BLOCK / 2, ..., 1. */
static float block_sum(float x[BLOCK]) {
    for (int half = BLOCK / 2; half >= 1; half /= 2)
        for (int i = 0; i < half; ++i) x[i] += x[i + half];
    return x[0];
}

/* NormProp's first pass over `count` coordinates (a->param is NULL): the state updated, the
 * direction d written to a->delta (0 for the coordinates of the zero-gradient contract) and,
 * per block of BLOCK coordinates from the first, a->stats[4 b .. 4 b + 3] = the sums of
 * d^2, adam^2 and the gain head over the block's counted coordinates, and their number. */
static void normprop_pass(const flatl2o_args *a, int64_t count) {
    for (int64_t b0 = 0; b0 < count; b0 += BLOCK) {
        float sums[3][BLOCK] = {{0}};
        int counted = 0;
        const int size = count - b0 < BLOCK ? (int)(count - b0) : BLOCK;
        for (int t0 = 0; t0 < size; t0 += TILE) {
            const int n = size - t0 < TILE ? size - t0 : TILE;
            const uint32_t keep = untouched_mask(a, b0 + t0, n);
            tile_stats ts;
            one_tile(a, b0 + t0, n, &ts);
            if (keep) leave_untouched(a, b0 + t0, n, keep, NULL);
            /* the coordinates that count: real ones the contract does not leave alone */
            const uint32_t counts = ((1u << n) - 1u) & ~keep;
            counted += __builtin_popcount(counts);
            for (int s = 0; s < 3; ++s)
                for (int t = 0; t < TILE; ++t)
                    sums[s][t0 + t] = counts >> t & 1u ? ts.stats[s][t] : 0.0f;
        }
        float *out = a->stats + 4 * (b0 / BLOCK);
        for (int s = 0; s < 3; ++s) out[s] = block_sum(sums[s]);
        out[3] = (float)counted;
    }
}

/* One rule step for `count` coordinates, tile by tile, leaving alone the coordinates of the
 * zero-gradient contract (untouched_mask). NormProp's is its first pass (normprop_pass; the
 * second is flatl2o_scale_step). Returns 0, or -1 for an unsupported shape. */
int flatl2o_step(const flatl2o_args *a, int64_t count) {
    if (unsupported(a)) return -1;
    if (a->prep == PREP_NORMPROP) {
        if (a->param) return -1; /* the direction goes to delta, the step comes later */
        normprop_pass(a, count);
        return 0;
    }
    tile_stats unused; /* NormProp's outputs only */
    for (int64_t i0 = 0; i0 < count; i0 += TILE) {
        const int n = count - i0 < TILE ? (int)(count - i0) : TILE;
        const uint32_t keep = untouched_mask(a, i0, n);
        float saved[TILE];
        if (keep && a->param) memcpy(saved, a->param + i0, n * sizeof(float));
        one_tile(a, i0, n, &unused);
        if (keep) leave_untouched(a, i0, n, keep, saved);
    }
    return 0;
}

/* NormProp's per-tensor totals: out[s] = the sum over `blocks` blocks of stats[4 b + s], in
 * double, block after block (an order that does not depend on the thread split). */
void flatl2o_block_totals(const float *stats, int64_t blocks, double out[4]) {
    double sums[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t b = 0; b < blocks; ++b)
        for (int s = 0; s < 4; ++s) sums[s] += (double)stats[4 * b + s];
    for (int s = 0; s < 4; ++s) out[s] = sums[s];
}

/* NormProp's second pass: param[i] -= lr * (scale * d[i]), as the reference applies the
 * tensor's update scale * d (a coordinate of the zero-gradient contract has d = 0). */
void flatl2o_scale_step(float *param, const float *d, float scale, float lr, int64_t count) {
    for (int64_t i = 0; i < count; ++i) param[i] -= lr * (scale * d[i]);
}
