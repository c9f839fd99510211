/* Fused float32 CPU kernels for the fast decoder (engine.py) and the replayed update (replay.py); loaded by
 * kernels.py, which compiles this file once per machine and falls back to the torch operations where it cannot.
 *
 * Why: on a CPU a decode step of a small model runs many small elementwise operations per layer (RMSNorm with
 * its record, rotary, the key/value cache writes, the one-query attention, SwiGLU), each a dispatch and a pass
 * over memory; here each group is one call and one pass, and decode_layers runs a whole step, products included
 * (through the BLAS torch links), without returning to Python. The update's SwiGLU and its backward, RMSNorm's
 * backward and the rotary transpose with the packing of q|k|v's gradient likewise become one pass each.
 *
 * Rounding: the same operations in the same order as the torch code they replace, except that sums run in a
 * different order (the compiler may reassociate them, to vectorise) and exp is evaluated here (a few units in the
 * last place), so results agree to float rounding, not bit for bit. Compiled with -ffp-contract=off: no fused
 * multiply-adds where the torch code has a separate multiply and add.
 *
 * Layouts: every matrix is rows of contiguous floats; a row stride is given where a matrix is a view. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* exp for float32: Cephes' range reduction and polynomial (about 1 ulp), written so that it vectorises (the
 * clamps as selects, 2^n by its bits; -fno-trapping-math lets the compiler if-convert them). */
#pragma omp declare simd
static inline float exp_f(float x) {
    x = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n */
    float s;
    memcpy(&s, &bits, sizeof s);
    return p * s;
}

#pragma omp declare simd
static inline float silu_f(float g) { return g / (1.0f + exp_f(-g)); }

/* RMSNorm of B rows of width D, as transformers: r = (mean(x²) + eps)^-1/2, x̂ = x·r, h = w·x̂ (h's rows
 * contiguous). x̂ (row stride sxh) and r (stride sr) are written only when given (the decode's record). */
void rms_norm(const float* x, int64_t sx, const float* w, float eps, float* xhat, int64_t sxh, float* r,
              int64_t sr, float* h, int64_t B, int64_t D) {
    for (int64_t b = 0; b < B; b++) {
        const float* xb = x + b * sx;
        float ss = 0.0f;
        #pragma omp simd reduction(+:ss)
        for (int64_t i = 0; i < D; i++) ss += xb[i] * xb[i];
        float rb = 1.0f / sqrtf(ss / (float)D + eps);
        float* hb = h + b * D;
        if (r) r[b * sr] = rb;
        if (xhat) {
            float* xh = xhat + b * sxh;
            #pragma omp simd
            for (int64_t i = 0; i < D; i++) { xh[i] = xb[i] * rb; hb[i] = xh[i] * w[i]; }
        } else {
            #pragma omp simd
            for (int64_t i = 0; i < D; i++) hb[i] = (xb[i] * rb) * w[i];
        }
    }
}

/* One decode step's q|k|v bias, rotary embedding and cache writes, for B rows of q|k|v ([H + 2K] heads of width
 * d, row stride sq): the bias (if given) added; queries and keys rotated in place, y = x·cos + roll(x, d/2)·sin
 * with sin's first half negated (engine._signed_sin), at each row's position pos[b] of the tables
 * [positions, d]; then the rotated keys and the values written to the caches kc, vc [B, K, cap, d] at t. */
void rope_cache(float* qkv, int64_t sq, const float* bias, const float* cos_t, const float* sin_t,
                const int64_t* pos, float* kc, float* vc, int64_t B, int64_t H, int64_t K, int64_t d, int64_t cap,
                int64_t t) {
    int64_t half = d / 2;
    for (int64_t b = 0; b < B; b++) {
        float* row = qkv + b * sq;
        const float* c = cos_t + pos[b] * d;
        const float* s = sin_t + pos[b] * d;
        for (int64_t hd = 0; hd < H + 2 * K; hd++) {
            float* x = row + hd * d;
            if (bias) {
                const float* bh = bias + hd * d;
                #pragma omp simd
                for (int64_t i = 0; i < d; i++) x[i] += bh[i];
            }
            if (hd < H + K) {
                float y[d];
                #pragma omp simd
                for (int64_t i = 0; i < half; i++) {
                    y[i] = x[i] * c[i] + x[i + half] * s[i];
                    y[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
                }
                memcpy(x, y, sizeof(float) * d);
            }
            if (hd >= H) {
                float* cache = hd < H + K ? kc + ((b * K + hd - H) * cap + t) * d
                                          : vc + ((b * K + hd - H - K) * cap + t) * d;
                memcpy(cache, x, sizeof(float) * d);
            }
        }
    }
}

/* SwiGLU's product a = silu(g)·u for M rows of [g | u] (width 2I, row stride sgu; row idx[m] where idx is given,
 * so the update reads the decode's record through its packing without a gathered copy) into a (contiguous). */
void swiglu(const float* gu, int64_t sgu, const int64_t* idx, float* a, int64_t M, int64_t I) {
    #pragma omp parallel for schedule(static) if (M * I >= 16384)
    for (int64_t m = 0; m < M; m++) {
        const float* g = gu + (idx ? idx[m] : m) * sgu;
        const float* u = g + I;
        float* am = a + m * I;
        #pragma omp simd
        for (int64_t i = 0; i < I; i++) am[i] = silu_f(g[i]) * u[i];
    }
}

/* SwiGLU's backward given da: dg = da·u·σ(g)·(1 + g·(1 − σ(g))) (torch's silu_backward), du = da·silu(g), into
 * dgu [M, 2I] (contiguous) as [dg | du]; [g | u] read as swiglu reads it. */
void swiglu_backward(const float* da, const float* gu, int64_t sgu, const int64_t* idx, float* dgu, int64_t M,
                     int64_t I) {
    #pragma omp parallel for schedule(static) if (M * I >= 16384)
    for (int64_t m = 0; m < M; m++) {
        const float* g = gu + (idx ? idx[m] : m) * sgu;
        const float* u = g + I;
        const float* dam = da + m * I;
        float* dg = dgu + m * 2 * I;
        float* du = dg + I;
        #pragma omp simd
        for (int64_t i = 0; i < I; i++) {
            float sig = 1.0f / (1.0f + exp_f(-g[i]));
            du[i] = dam[i] * (g[i] * sig);
            dg[i] = (dam[i] * u[i]) * (sig * (1.0f + g[i] * (1.0f - sig)));
        }
    }
}

/* RMSNorm's backward for M rows of width D given dh, the gradient of h = w·x̂: dx += r·(ĝ − x̂·mean(ĝ·x̂)),
 * ĝ = w·dh (when dx is given), and dw = Σ_m dh·x̂ (when dw is given; per-thread partial sums added in thread
 * order, so the result does not depend on scheduling). */
void rms_backward(const float* dh, const float* xhat, const float* r, const float* w, float* dx, float* dw,
                  int64_t M, int64_t D) {
    int nt = (M * D >= 65536) ? omp_get_max_threads() : 1;
    float* part = dw ? calloc((size_t)nt * D, sizeof(float)) : NULL;
    #pragma omp parallel num_threads(nt)
    {
        float* mine = part ? part + (int64_t)omp_get_thread_num() * D : NULL;
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) {
            const float* dhm = dh + m * D;
            const float* xm = xhat + m * D;
            if (mine) {
                #pragma omp simd
                for (int64_t i = 0; i < D; i++) mine[i] += dhm[i] * xm[i];
            }
            if (dx) {
                float c = 0.0f;
                #pragma omp simd reduction(+:c)
                for (int64_t i = 0; i < D; i++) c += (w[i] * dhm[i]) * xm[i];
                c /= (float)D;
                float* dxm = dx + m * D;
                float rm = r[m];
                #pragma omp simd
                for (int64_t i = 0; i < D; i++) dxm[i] += (w[i] * dhm[i] - xm[i] * c) * rm;
            }
        }
    }
    if (part) {
        for (int t = 0; t < nt; t++)
            for (int64_t i = 0; i < D; i++) dw[i] += part[(int64_t)t * D + i];
        free(part);
    }
}

/* The replayed attention's gradients back through the rotary embedding, into the packed q|k|v rows
 * (replay.Packing). dq [R, K, G, L, d], dk and dv [R, K, L, d]: the attention layout; cos, sin [L·R, d] at each
 * position m = l·R + r (sin signed as the engine's); own[m]: m's packed row, or P where m is not kept; src[m]: the
 * packed row m's gradient goes to (its own, or its prompt's representative's), or P where none does. Writes every
 * packed row of dqkv [P, (H + 2K)·d] once, from its own position (in parallel), then adds the positions whose
 * prompt another row holds (in order). The rotation's transpose: x = dy·cos + roll(dy·sin, d/2). */
static void rope_back_one(const float* dq, const float* dk, const float* dv, const float* c, const float* s,
                          float* out, int add, int64_t R, int64_t K, int64_t G, int64_t L, int64_t d, int64_t l,
                          int64_t r) {
    int64_t half = d / 2;
    for (int64_t kh = 0; kh < K; kh++) {
        for (int64_t j = 0; j <= G + 1; j++) {  /* G query heads, then the key, then the value */
            const float* y = j < G ? dq + ((((r * K + kh) * G + j) * L + l) * d)
                           : (j == G ? dk : dv) + (((r * K + kh) * L + l) * d);
            float* o = out + (j < G ? (kh * G + j) : j == G ? (K * G + kh) : (K * G + K + kh)) * d;
            float x[d];
            if (j <= G) {
                #pragma omp simd
                for (int64_t i = 0; i < half; i++) {
                    x[i] = y[i] * c[i] + y[i + half] * s[i + half];
                    x[i + half] = y[i + half] * c[i + half] + y[i] * s[i];
                }
            } else {
                memcpy(x, y, sizeof(float) * d);
            }
            if (add) {
                #pragma omp simd
                for (int64_t i = 0; i < d; i++) o[i] += x[i];
            } else {
                memcpy(o, x, sizeof(float) * d);
            }
        }
    }
}

void rope_back_pack(const float* dq, const float* dk, const float* dv, const float* cos_m, const float* sin_m,
                    const int64_t* own, const int64_t* src, float* dqkv, int64_t P, int64_t R, int64_t K, int64_t G,
                    int64_t L, int64_t d) {
    int64_t F = (K * G + 2 * K) * d;
    #pragma omp parallel for schedule(static)
    for (int64_t m = 0; m < L * R; m++)
        if (own[m] < P)
            rope_back_one(dq, dk, dv, cos_m + m * d, sin_m + m * d, dqkv + own[m] * F, 0, R, K, G, L, d, m / R,
                          m % R);
    for (int64_t m = 0; m < L * R; m++)
        if (own[m] >= P && src[m] < P)
            rope_back_one(dq, dk, dv, cos_m + m * d, sin_m + m * d, dqkv + src[m] * F, 1, R, K, G, L, d, m / R,
                          m % R);
}

/* Here the compiler may reassociate sums (and products): the dot products and the softmax's sum then keep their
 * partial sums in vector registers instead of the memory gcc gives omp simd reductions (61 against 72 µs a call
 * on the benchmark model's shapes). Nothing in this function needs torch's rounding order. */
#pragma GCC push_options
#pragma GCC optimize("associative-math", "no-signed-zeros")
/* One-query attention of a decode step, for B rows: softmax(q·kᵀ·scale)·v over the keys start[b] … L − 1 of the
 * caches kc, vc [B, K, cap, d] (left padding before start[b]); q: query heads [K·G, d] per row (row stride sq,
 * head h = k·G + g uses key/value head k); out [B, K·G·d] (row stride so). In parallel over (row, key head). */
void attend_step(const float* q, int64_t sq, const float* kc, const float* vc, const int64_t* start, float* out,
                 int64_t so, int64_t B, int64_t K, int64_t G, int64_t d, int64_t cap, int64_t L, float scale) {
    #pragma omp parallel for schedule(static)
    for (int64_t bk = 0; bk < B * K; bk++) {
        int64_t b = bk / K, kh = bk % K, l0 = start[b], n = L - l0;
        const float* kb = kc + (bk * cap + l0) * d;
        const float* vb = vc + (bk * cap + l0) * d;
        float p[n > 0 ? n : 1];
        for (int64_t g = 0; g < G; g++) {
            const float* qg = q + b * sq + (kh * G + g) * d;
            float mx = -3.0e38f;
            for (int64_t l = 0; l < n; l++) {
                const float* kl = kb + l * d;
                float acc = 0.0f;
                for (int64_t i = 0; i < d; i++) acc += qg[i] * kl[i];
                p[l] = acc * scale;
                mx = p[l] > mx ? p[l] : mx;
            }
            float sum = 0.0f;
            for (int64_t l = 0; l < n; l++) { p[l] = exp_f(p[l] - mx); sum += p[l]; }
            float* og = out + b * so + (kh * G + g) * d;
            float acc[d];
            #pragma omp simd
            for (int64_t i = 0; i < d; i++) acc[i] = 0.0f;
            for (int64_t l = 0; l < n; l++) {
                const float* vl = vb + l * d;
                float pl = p[l] / sum;
                #pragma omp simd
                for (int64_t i = 0; i < d; i++) acc[i] += pl * vl[i];
            }
            memcpy(og, acc, sizeof(float) * d);
        }
    }
}
#pragma GCC pop_options

/* A whole one-token decode step through the layers, for engines whose products can run through BLAS from here
 * (set_sgemm: the Fortran sgemm torch's own BLAS exports). Each layer: RMSNorm (its record kept), q|k|v, bias,
 * rotary and cache writes, attention, the o projection added into the residual stream, RMSNorm, gate|up, SwiGLU,
 * the down projection added into the residual stream: the same kernels and products as engine.py's one-token
 * step, without a return to Python between them. */
typedef void (*sgemm_fn)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
static sgemm_fn sgemm_p = 0;

void set_sgemm(void* f) { sgemm_p = (sgemm_fn)f; }

/* MKL's packed products (cblas_sgemm_pack_get_size, cblas_sgemm_pack, cblas_sgemm_compute; 32-bit integers):
 * a weight packed once per sampling call into the layout MKL's kernel reads, instead of packed again by every
 * sgemm call, at every step (measured: the decode's products 1.2x faster at the benchmark's shapes). The
 * enumerations' values are CBLAS's. */
enum { COL_MAJOR = 102, NO_TRANS = 111, TRANS = 112, A_MATRIX = 161, PACKED = 151 };
typedef size_t (*pack_size_fn)(int, int, int, int);
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float*, int, float*);
typedef void (*compute_fn)(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int);
static pack_size_fn pack_size_p = 0;
static pack_fn pack_p = 0;
static compute_fn compute_p = 0;

void set_packed_gemm(void* size, void* pack, void* compute) {
    pack_size_p = (pack_size_fn)size;
    pack_p = (pack_fn)pack;
    compute_p = (compute_fn)compute;
}

/* Bytes the packed form of w [out, in] takes for products with B rows (-1 without the packed products). */
int64_t packed_bytes(int64_t out, int64_t in, int64_t B) {
    return pack_size_p ? (int64_t)pack_size_p(A_MATRIX, (int)out, (int)B, (int)in) : -1;
}

/* w [out, in] (contiguous) packed into dest (packed_bytes of it) for linear()'s product with B rows. */
int pack_weight(const float* w, int64_t out, int64_t in, int64_t B, float* dest) {
    if (!pack_p) return 1;
    pack_p(COL_MAJOR, A_MATRIX, TRANS, (int)out, (int)B, (int)in, 1.0f, w, (int)in, dest);
    return 0;
}

/* c [B, out] (row stride ldc) = a [B, in] (row stride lda) · wᵀ (w [out, in], contiguous) + beta·c; through wp, w
 * packed by pack_weight for B rows, where it is not 0 */
static void linear(const float* a, int64_t lda, const float* w, const float* wp, int64_t out, int64_t in, float* c,
                   int64_t ldc, float beta, int64_t B) {
    int m = (int)out, n = (int)B, k = (int)in, la = (int)in, lb = (int)lda, lc = (int)ldc;
    float alpha = 1.0f;
    if (wp)
        compute_p(COL_MAJOR, PACKED, NO_TRANS, m, n, k, wp, la, a, lb, beta, c, lc);
    else
        sgemm_p("T", "N", &m, &n, &k, &alpha, w, &la, a, &lb, &beta, c, &lc);
}

/* c [B, out] = a [B, in] (row stride lda) · wᵀ + beta·c through wp, w packed by pack_weight for B rows; from
 * Python (kernels.packed_linear), for the benchmark's floor of the decode's products. */
int packed_linear(const float* a, int64_t lda, const float* wp, int64_t out, int64_t in, float* c, int64_t ldc,
                  float beta, int64_t B) {
    if (!compute_p) return 1;
    linear(a, lda, 0, wp, out, in, c, ldc, beta, B);
    return 0;
}

static float* slot(void* base, int64_t at, int64_t B, int64_t F, float* otherwise) {
    return base ? (float*)base + at * B * F : otherwise;
}

/* W: per layer 9 pointers (ln1, W_qkv [F, D], b_qkv or 0, W_o [D, H·d], ln2, W_gu [2I, D], W_down [D, I], key
 * cache, value cache); Wp: per layer the 4 products' weights packed by pack_weight for B rows (q|k|v, o, gate|up,
 * down), or 0 (sgemm); rec: per layer 7 record bases [cap, B, width] (x̂1, r1, q|k|v, attention, x̂2, r2, gate|up)
 * or 0 without a record; x [B, D]: the residual stream, updated in place; the rest: scratch. */
int decode_layers(int64_t n_layers, void** W, void** Wp, void** rec, float* x, float* h, float* qkv_buf, float* att_buf,
                  float* gu_buf, float* a_buf, const float* cos_t, const float* sin_t, const int64_t* pos,
                  const int64_t* start, int64_t B, int64_t D, int64_t H, int64_t K, int64_t d, int64_t I,
                  int64_t cap, int64_t at, float eps) {
    if (!sgemm_p || (Wp && !compute_p)) return 1;
    int64_t F = (H + 2 * K) * d, Hd = H * d;
    for (int64_t l = 0; l < n_layers; l++) {
        void** w = W + 9 * l;
        const float* const* wp = Wp ? (const float* const*)(Wp + 4 * l) : 0;
        void** r = rec ? rec + 7 * l : 0;
        rms_norm(x, D, (const float*)w[0], eps, r ? slot(r[0], at, B, D, 0) : 0, D, r ? slot(r[1], at, B, 1, 0) : 0,
                 1, h, B, D);
        float* qkv = r ? slot(r[2], at, B, F, qkv_buf) : qkv_buf;
        linear(h, D, (const float*)w[1], wp ? wp[0] : 0, F, D, qkv, F, 0.0f, B);
        rope_cache(qkv, F, (const float*)w[2], cos_t, sin_t, pos, (float*)w[7], (float*)w[8], B, H, K, d, cap, at);
        float* att = r ? slot(r[3], at, B, Hd, att_buf) : att_buf;
        attend_step(qkv, F, (const float*)w[7], (const float*)w[8], start, att, Hd, B, K, H / K, d, cap, at + 1,
                    1.0f / sqrtf((float)d));
        linear(att, Hd, (const float*)w[3], wp ? wp[1] : 0, D, Hd, x, D, 1.0f, B);
        rms_norm(x, D, (const float*)w[4], eps, r ? slot(r[4], at, B, D, 0) : 0, D, r ? slot(r[5], at, B, 1, 0) : 0,
                 1, h, B, D);
        float* gu = r ? slot(r[6], at, B, 2 * I, gu_buf) : gu_buf;
        linear(h, D, (const float*)w[5], wp ? wp[2] : 0, 2 * I, D, gu, 2 * I, 0.0f, B);
        swiglu(gu, 2 * I, 0, a_buf, B, I);
        linear(a_buf, I, (const float*)w[6], wp ? wp[3] : 0, D, I, x, D, 1.0f, B);
    }
    return 0;
}
