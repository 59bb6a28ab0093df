/* Fused selective scan (S6) for CPUs: forward and backward, fp32, state in registers.
 *
 * Built on first use by cpu_kernel.py with the machine's C compiler (no build step at install time);
 * where no compiler is found the pure-PyTorch backend is used instead. Semantics of the core
 * recurrence, per batch b, channel d (group g = d / (dim / groups)), state n, position t:
 *
 *     dt[t]  = softplus(delta[t] + bias[d])   (softplus and bias optional)
 *     a[t,n] = exp(dt[t] * A[d,n])
 *     h[t,n] = a[t,n] * h[t-1,n] + dt[t] * u[t] * B[g,t,n]          (h[-1] = 0)
 *     y[t]   = sum_n C[g,t,n] * h[t,n] + Dskip[d] * u[t]
 *
 * The z gate is applied outside (PyTorch autograd). B and C come in as
 * (batch, groups, length, state) so that the state is the contiguous, vectorised axis; u, dt, y as
 * (batch, dim, length). The forward keeps the state at the start of every `chunk` positions; the
 * backward recomputes one chunk at a time into a small buffer (as mamba-ssm's CUDA kernel does) and
 * runs the adjoint recurrence g[t] = dy[t] C[t] + a[t+1] g[t+1] backwards.
 *
 * Threads (OpenMP, when the compiler has it): the forward splits the (batch, dim) pairs; the
 * backward too, each thread accumulating dB, dC, dA, dD in private buffers that are summed at the end.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define API __attribute__((visibility("default")))

API int scan_abi_version(void) { return 2; }

/* exp(x) in fp32 with a relative error of about 1 ulp (Cephes' expf), written out so that the state
 * loops vectorise without a vector math library (glibc's libmvec is not everywhere, and its narrow-vector
 * variants measured 2x slower here). Arguments are clamped to [-87.3, 88.3]: below, exp is a denormal
 * that a decaying state cannot tell from the 1e-38 returned. */
static inline __attribute__((always_inline)) float decay_exp(float x)
{
    x = fminf(fmaxf(x, -87.3f), 88.3f);
    const float k = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = { .i = ((int32_t)k + 127) << 23 };
    return p * scale.f;
}

/* softplus as PyTorch computes it (threshold 20), and its derivative */
static inline float step_size(float pre, int softplus) { return (softplus && pre <= 20.0f) ? log1pf(expf(pre)) : pre; }
static inline float step_size_slope(float pre, int softplus) { return (softplus && pre <= 20.0f) ? 1.0f / (1.0f + expf(-pre)) : 1.0f; }

/* One (batch, channel) pair's forward. `state` is a compile-time constant in the specialised calls below,
 * so that the state loops are fully vectorised (a runtime trip count of 8 would fall into a scalar tail). */
static inline __attribute__((always_inline)) void forward_channel(
    const int64_t state, int64_t length, int64_t chunk, const float *restrict ub, const float *restrict deltab,
    float shift, int softplus, const float *restrict Ad, const float *restrict Bg, const float *restrict Cg,
    float skip, float *restrict yb, float *restrict saved, float *restrict last, float *restrict dtbuf)
{
    float h[state];
    for (int64_t n = 0; n < state; n++) h[n] = 0.0f;
    for (int64_t t0 = 0; t0 < length; t0 += chunk) {
        const int64_t len = (t0 + chunk < length) ? chunk : length - t0;
        memcpy(saved + (t0 / chunk) * state, h, sizeof(float) * state);
        /* the step sizes of the chunk first: independent positions, so the transcendentals vectorise */
        for (int64_t i = 0; i < len; i++) dtbuf[i] = step_size(deltab[t0 + i] + shift, softplus);
        for (int64_t i = 0; i < len; i++) {
            const int64_t t = t0 + i;
            const float dtt = dtbuf[i], x = dtt * ub[t];
            const float *Bt = Bg + t * state, *Ct = Cg + t * state;
            float acc = 0.0f;
            for (int64_t n = 0; n < state; n++) {
                h[n] = decay_exp(dtt * Ad[n]) * h[n] + x * Bt[n];
                acc += Ct[n] * h[n];
            }
            yb[t] = acc + skip * ub[t];
        }
    }
    memcpy(last, h, sizeof(float) * state);
}

/* One (batch, channel) pair's backward: chunk by chunk from the end, the chunk's states recomputed from
 * the saved start state, then the adjoint recurrence backwards through the chunk. */
static inline __attribute__((always_inline)) void backward_channel(
    const int64_t state, int64_t length, int64_t chunk, const float *restrict ub, const float *restrict deltab,
    float shift, int softplus, const float *restrict Ad, const float *restrict Bg, const float *restrict Cg,
    float skip, const float *restrict dyb, const float *restrict dlastb, const float *restrict saved,
    float *restrict dub, float *restrict ddeltab, float *restrict dAd, float *restrict dBg, float *restrict dCg,
    float *restrict dDd, float *restrict dbiasd, float *restrict hbuf, float *restrict abuf,
    float *restrict dtbuf, float *restrict slopebuf)
{
    const int64_t nchunks = (length + chunk - 1) / chunk;
    float gcarry[state], dAacc[state];
    double dDacc = 0.0, dbiasacc = 0.0;
    for (int64_t n = 0; n < state; n++) {
        gcarry[n] = dlastb ? dlastb[n] : 0.0f;
        dAacc[n] = 0.0f;
    }
    for (int64_t c = nchunks - 1; c >= 0; c--) {
        const int64_t t0 = c * chunk, len = (t0 + chunk < length) ? chunk : length - t0;
        memcpy(hbuf, saved + c * state, sizeof(float) * state);
        for (int64_t i = 0; i < len; i++) {
            const float pre = deltab[t0 + i] + shift;
            dtbuf[i] = step_size(pre, softplus);
            slopebuf[i] = step_size_slope(pre, softplus);
        }
        for (int64_t i = 0; i < len; i++) {
            const int64_t t = t0 + i;
            const float dtt = dtbuf[i], x = dtt * ub[t];
            const float *Bt = Bg + t * state;
            const float *hp = hbuf + i * state;
            float *hn = hbuf + (i + 1) * state, *an = abuf + i * state;
            for (int64_t n = 0; n < state; n++) {
                an[n] = decay_exp(dtt * Ad[n]);
                hn[n] = an[n] * hp[n] + x * Bt[n];
            }
        }
        for (int64_t i = len - 1; i >= 0; i--) {
            const int64_t t = t0 + i;
            const float dyt = dyb[t], dtt = dtbuf[i], ut = ub[t], x = dtt * ut;
            const float *Bt = Bg + t * state, *Ct = Cg + t * state;
            float *dBt = dBg + t * state, *dCt = dCg + t * state;
            const float *hp = hbuf + i * state, *hn = hbuf + (i + 1) * state, *an = abuf + i * state;
            float s = 0.0f, sw = 0.0f;
            for (int64_t n = 0; n < state; n++) {
                const float gn = dyt * Ct[n] + gcarry[n];
                dCt[n] += dyt * hn[n];
                dBt[n] += gn * x;
                s += gn * Bt[n];
                const float w = gn * an[n] * hp[n];
                sw += w * Ad[n];
                dAacc[n] += w * dtt;
                gcarry[n] = an[n] * gn;
            }
            dub[t] = dtt * s + skip * dyt;
            const float dpre = (ut * s + sw) * slopebuf[i];
            ddeltab[t] = dpre;
            dbiasacc += dpre;
            dDacc += (double)dyt * ut;
        }
    }
    for (int64_t n = 0; n < state; n++) dAd[n] += dAacc[n];
    if (dDd) *dDd += (float)dDacc;
    if (dbiasd) *dbiasd += (float)dbiasacc;
}

/* state sizes with a specialised (fully vectorised) body; others take the generic one */
#define DISPATCH_STATE(call)                      \
    switch (state) {                              \
    case 4: { const int64_t st = 4; call; break; }   \
    case 8: { const int64_t st = 8; call; break; }   \
    case 16: { const int64_t st = 16; call; break; } \
    case 32: { const int64_t st = 32; call; break; } \
    default: { const int64_t st = state; call; }     \
    }

API void scan_forward(int64_t batch, int64_t dim, int64_t length, int64_t state, int64_t groups, int64_t chunk,
                      const float *restrict u, const float *restrict delta, const float *restrict bias, int softplus,
                      const float *restrict A, const float *restrict Bm, const float *restrict Cm,
                      const float *restrict Dskip, float *restrict y, float *restrict chunk_states,
                      float *restrict last_state, int threads)
{
    const int64_t heads = dim / groups;
    const int64_t nchunks = (length + chunk - 1) / chunk;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t bd = 0; bd < batch * dim; bd++) {
        const int64_t b = bd / dim, d = bd % dim, g = d / heads;
        const int64_t goff = (b * groups + g) * length * state;
        float dtbuf[chunk];
        DISPATCH_STATE(forward_channel(st, length, chunk, u + bd * length, delta + bd * length, bias ? bias[d] : 0.0f,
                                       softplus, A + d * state, Bm + goff, Cm + goff, Dskip ? Dskip[d] : 0.0f,
                                       y + bd * length, chunk_states + bd * nchunks * state,
                                       last_state + bd * state, dtbuf))
    }
}

API void scan_backward(int64_t batch, int64_t dim, int64_t length, int64_t state, int64_t groups, int64_t chunk,
                       const float *restrict u, const float *restrict delta, const float *restrict bias, int softplus,
                       const float *restrict A, const float *restrict Bm, const float *restrict Cm,
                       const float *restrict Dskip, const float *restrict dy, const float *restrict dlast,
                       const float *restrict chunk_states, float *restrict du, float *restrict ddelta,
                       float *restrict dA, float *restrict dB, float *restrict dC, float *restrict dD,
                       float *restrict dbias, int threads)
{
    const int64_t heads = dim / groups;
    const int64_t nchunks = (length + chunk - 1) / chunk;
    const int64_t bc_size = batch * groups * length * state;
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = threads > 1 ? threads : 1;
#else
    (void)threads;
#endif
    /* thread 0 accumulates straight into the outputs, the others into private copies of dB, dC, dA, dD, dbias */
    const int64_t priv_size = 2 * bc_size + dim * state + 2 * dim;
    float *priv = NULL;
    if (nthreads > 1) {
        priv = calloc((size_t)(nthreads - 1) * priv_size, sizeof(float));
        if (!priv) nthreads = 1;
    }
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float *mydB = dB, *mydC = dC, *mydA = dA, *mydD = dD, *mybias = dbias;
        if (tid > 0) {
            float *base = priv + (size_t)(tid - 1) * priv_size;
            mydB = base; mydC = base + bc_size; mydA = base + 2 * bc_size; mydD = mydA + dim * state;
            mybias = mydD + dim;
        }
        float *hbuf = malloc(sizeof(float) * (size_t)(chunk + 1) * state);
        float *abuf = malloc(sizeof(float) * (size_t)chunk * state);
        float *dtbuf = malloc(sizeof(float) * (size_t)chunk), *slopebuf = malloc(sizeof(float) * (size_t)chunk);
#pragma omp for schedule(static)
        for (int64_t bd = 0; bd < batch * dim; bd++) {
            const int64_t b = bd / dim, d = bd % dim, g = d / heads;
            const int64_t goff = (b * groups + g) * length * state;
            DISPATCH_STATE(backward_channel(st, length, chunk, u + bd * length, delta + bd * length,
                                            bias ? bias[d] : 0.0f, softplus, A + d * state, Bm + goff, Cm + goff,
                                            Dskip ? Dskip[d] : 0.0f, dy + bd * length,
                                            dlast ? dlast + bd * state : NULL, chunk_states + bd * nchunks * state,
                                            du + bd * length, ddelta + bd * length, mydA + d * state, mydB + goff,
                                            mydC + goff, (Dskip && mydD) ? mydD + d : NULL,
                                            (bias && mybias) ? mybias + d : NULL, hbuf, abuf, dtbuf, slopebuf))
        }
        free(hbuf); free(abuf); free(dtbuf); free(slopebuf);
    }
    if (priv) {
        for (int k = 0; k < nthreads - 1; k++) {
            const float *base = priv + (size_t)k * priv_size;
#pragma omp parallel for schedule(static) num_threads(nthreads)
            for (int64_t i = 0; i < bc_size; i++) { dB[i] += base[i]; dC[i] += base[bc_size + i]; }
            for (int64_t i = 0; i < dim * state; i++) dA[i] += base[2 * bc_size + i];
            if (dD) for (int64_t i = 0; i < dim; i++) dD[i] += base[2 * bc_size + dim * state + i];
            if (dbias) for (int64_t i = 0; i < dim; i++) dbias[i] += base[2 * bc_size + dim * state + dim + i];
        }
        free(priv);
    }
}
