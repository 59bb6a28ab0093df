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
 * (batch, groups, length, state) so that the state is the contiguous, vectorised axis; u, dt, y (and their
 * gradients) as (batch, dim, length), or with `channels_last` as (batch, length, dim), the layout of
 * tokens that come from and go to linear layers (no transposed copies on either side). The forward keeps the state at the start of every `chunk` positions; the
 * backward recomputes one chunk at a time into a small buffer (as mamba-ssm's CUDA kernel does) and
 * runs the adjoint recurrence g[t] = dy[t] C[t] + a[t+1] g[t+1] backwards.
 *
 * Work is split into blocks of up to CHANNEL_BLOCK channels of one batch element and group (they share
 * B and C, see below). Threads (OpenMP, when the compiler has it) split the blocks; in the backward each
 * thread accumulates dB, dC, dA, dD in private buffers that are summed at the end.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define API __attribute__((visibility("default")))

API int scan_abi_version(void) { return 3; }

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

/* Most channels per block. The channels of one group share B and C; a block of them walks the sequence
 * chunk by chunk, each channel in turn through the chunk, so that the chunk's B, C (and in the backward
 * dB, dC) are read once per block, from the cache, instead of streaming from memory once per channel.
 * Per channel those streams are 6 x state floats per position against 3 floats of u, delta and dy: on
 * long sequences (an nnU-Net full-size map) they bound the backward. Within a chunk each channel's loop
 * is the plain one-channel recurrence with its state and adjoint in registers. Blocks are as wide as
 * this allows unless the threads need more of them (see channel_block); wide blocks also read tokens
 * stored channels last a whole cache line at a time. */
#ifndef CHANNEL_BLOCK
#define CHANNEL_BLOCK 64
#endif

/* Copies between a chunk of `nch` channels (channel k at k * cs, position t at t * ps) and a buffer that
 * holds them at unit stride (channel k at k * chunk): u, delta, dy come from and y, du, ddelta go to
 * either layout, while the recurrences read and write only the buffers (strided, the step sizes' softplus
 * would not vectorise and every position would touch its own cache line). */
static inline void stage_in(float *restrict buf, const float *restrict src, int64_t nch, int64_t len,
                            int64_t chunk, int64_t cs, int64_t ps)
{
    for (int64_t k = 0; k < nch; k++)
        for (int64_t i = 0; i < len; i++) buf[k * chunk + i] = src[k * cs + i * ps];
}

static inline void stage_out(float *restrict dst, const float *restrict buf, int64_t nch, int64_t len,
                             int64_t chunk, int64_t cs, int64_t ps)
{
    for (int64_t k = 0; k < nch; k++)
        for (int64_t i = 0; i < len; i++) dst[k * cs + i * ps] = buf[k * chunk + i];
}

/* The forward of `nch` (<= CHANNEL_BLOCK) channels of one batch element and group. Channel k's u, delta, y
 * start at k * cs and step ps per position (cs = length, ps = 1 channels first; cs = 1, ps = dim channels
 * last), its A at k * state, its saved states at k * nchunks * state, its last state at k * state.
 * `stage` holds 3 x nch x chunk floats. `state` is a compile-time constant in the specialised
 * calls below, so that the state loops are fully vectorised (a runtime trip count of 8 would fall into a
 * scalar tail). */
static inline __attribute__((always_inline)) void forward_block(
    const int64_t state, int64_t nch, int64_t length, int64_t chunk, int64_t nchunks, int64_t cs, int64_t ps,
    const float *restrict ub, const float *restrict deltab, const float *restrict shift, int softplus,
    const float *restrict Ad, const float *restrict Bg, const float *restrict Cg, const float *restrict skip,
    float *restrict yb, float *restrict saved, float *restrict last, float *restrict stage)
{
    float *ubuf = stage, *dtbuf = stage + nch * chunk, *ybuf = stage + 2 * nch * chunk;
    for (int64_t k = 0; k < nch; k++) memset(last + k * state, 0, sizeof(float) * state);
    for (int64_t t0 = 0; t0 < length; t0 += chunk) {
        const int64_t len = (t0 + chunk < length) ? chunk : length - t0;
        stage_in(ubuf, ub + t0 * ps, nch, len, chunk, cs, ps);
        stage_in(dtbuf, deltab + t0 * ps, nch, len, chunk, cs, ps);
        for (int64_t k = 0; k < nch; k++) {
            const float sh = shift ? shift[k] : 0.0f, sk = skip ? skip[k] : 0.0f;
            const float *uk = ubuf + k * chunk, *Ak = Ad + k * state;
            float *dtk = dtbuf + k * chunk, *yk = ybuf + k * chunk;
            float h[state];
            memcpy(h, last + k * state, sizeof(float) * state);  /* `last` carries the state between chunks */
            memcpy(saved + k * nchunks * state + (t0 / chunk) * state, h, sizeof(float) * state);
            /* the step sizes of the chunk first: independent positions, so the transcendentals vectorise */
            for (int64_t i = 0; i < len; i++) dtk[i] = step_size(dtk[i] + sh, softplus);
            for (int64_t i = 0; i < len; i++) {
                const float dtt = dtk[i], x = dtt * uk[i];
                const float *Bt = Bg + (t0 + i) * state, *Ct = Cg + (t0 + i) * state;
                float acc = 0.0f;
                for (int64_t n = 0; n < state; n++) {
                    h[n] = decay_exp(dtt * Ak[n]) * h[n] + x * Bt[n];
                    acc += Ct[n] * h[n];
                }
                yk[i] = acc + sk * uk[i];
            }
            memcpy(last + k * state, h, sizeof(float) * state);
        }
        stage_out(yb + t0 * ps, ybuf, nch, len, chunk, cs, ps);
    }
}

/* The backward of a block of channels (layout as in forward_block): chunk by chunk from the end; for each
 * channel of the block in turn, the chunk's states recomputed from its saved start state, then the
 * adjoint recurrence backwards through the chunk. The adjoint and dA of every channel are carried from
 * chunk to chunk in `carry` (2 x CHANNEL_BLOCK x state floats); `stage` holds 6 x nch x chunk floats,
 * `hbuf` (chunk + 1) x state and `abuf` chunk x state. */
static inline __attribute__((always_inline)) void backward_block(
    const int64_t state, int64_t nch, int64_t length, int64_t chunk, int64_t nchunks, int64_t cs, int64_t ps,
    const float *restrict ub, const float *restrict deltab, const float *restrict shift, int softplus,
    const float *restrict Ad, const float *restrict Bg, const float *restrict Cg, const float *restrict skip,
    const float *restrict dyb, const float *restrict dlastb, const float *restrict saved,
    float *restrict dub, float *restrict ddeltab, float *restrict dAd, float *restrict dBg, float *restrict dCg,
    float *restrict dDd, float *restrict dbiasd, float *restrict hbuf, float *restrict abuf,
    float *restrict stage, float *restrict carry)
{
    const int64_t tile = nch * chunk;
    float *ubuf = stage, *dybuf = stage + tile, *dtbuf = stage + 2 * tile, *slopebuf = stage + 3 * tile;
    float *dubuf = stage + 4 * tile, *ddbuf = stage + 5 * tile;
    float *gcarry = carry, *dAcarry = carry + CHANNEL_BLOCK * state;
    double dDacc[CHANNEL_BLOCK], dbiasacc[CHANNEL_BLOCK];
    for (int64_t k = 0; k < nch; k++) {
        for (int64_t n = 0; n < state; n++) {
            gcarry[k * state + n] = dlastb ? dlastb[k * state + n] : 0.0f;
            dAcarry[k * state + n] = 0.0f;
        }
        dDacc[k] = 0.0;
        dbiasacc[k] = 0.0;
    }
    for (int64_t c = nchunks - 1; c >= 0; c--) {
        const int64_t t0 = c * chunk, len = (t0 + chunk < length) ? chunk : length - t0;
        stage_in(ubuf, ub + t0 * ps, nch, len, chunk, cs, ps);
        stage_in(dybuf, dyb + t0 * ps, nch, len, chunk, cs, ps);
        stage_in(slopebuf, deltab + t0 * ps, nch, len, chunk, cs, ps);
        for (int64_t k = 0; k < nch; k++) {
            const float sh = shift ? shift[k] : 0.0f, sk = skip ? skip[k] : 0.0f;
            const float *uk = ubuf + k * chunk, *dyk = dybuf + k * chunk, *Ak = Ad + k * state;
            float *dtk = dtbuf + k * chunk, *slk = slopebuf + k * chunk;
            float *duk = dubuf + k * chunk, *ddk = ddbuf + k * chunk;
            float g[state], dAacc[state];
            memcpy(g, gcarry + k * state, sizeof(float) * state);
            memcpy(dAacc, dAcarry + k * state, sizeof(float) * state);
            memcpy(hbuf, saved + k * nchunks * state + c * state, sizeof(float) * state);
            for (int64_t i = 0; i < len; i++) {
                const float pre = slk[i] + sh;
                dtk[i] = step_size(pre, softplus);
                slk[i] = step_size_slope(pre, softplus);
            }
            for (int64_t i = 0; i < len; i++) {
                const float dtt = dtk[i], x = dtt * uk[i];
                const float *Bt = Bg + (t0 + i) * state;
                const float *hp = hbuf + i * state;
                float *hn = hbuf + (i + 1) * state, *an = abuf + i * state;
                for (int64_t n = 0; n < state; n++) {
                    an[n] = decay_exp(dtt * Ak[n]);
                    hn[n] = an[n] * hp[n] + x * Bt[n];
                }
            }
            double dDk = 0.0, dbiask = 0.0;
            for (int64_t i = len - 1; i >= 0; i--) {
                const int64_t t = t0 + i;
                const float dyt = dyk[i], dtt = dtk[i], ut = uk[i], x = dtt * ut;
                const float *Bt = Bg + t * state, *Ct = Cg + t * state;
                float *dBt = dBg + t * state, *dCt = dCg + t * state;
                const float *hp = hbuf + i * state, *hn = hbuf + (i + 1) * state, *an = abuf + i * state;
                float s = 0.0f, sw = 0.0f;
                for (int64_t n = 0; n < state; n++) {
                    const float gn = dyt * Ct[n] + g[n];
                    dCt[n] += dyt * hn[n];
                    dBt[n] += gn * x;
                    s += gn * Bt[n];
                    const float w = gn * an[n] * hp[n];
                    sw += w * Ak[n];
                    dAacc[n] += w * dtt;
                    g[n] = an[n] * gn;
                }
                duk[i] = dtt * s + sk * dyt;
                const float dpre = (ut * s + sw) * slk[i];
                ddk[i] = dpre;
                dbiask += dpre;
                dDk += (double)dyt * ut;
            }
            dDacc[k] += dDk;
            dbiasacc[k] += dbiask;
            memcpy(gcarry + k * state, g, sizeof(float) * state);
            memcpy(dAcarry + k * state, dAacc, sizeof(float) * state);
        }
        stage_out(dub + t0 * ps, dubuf, nch, len, chunk, cs, ps);
        stage_out(ddeltab + t0 * ps, ddbuf, nch, len, chunk, cs, ps);
    }
    for (int64_t k = 0; k < nch; k++) {
        for (int64_t n = 0; n < state; n++) dAd[k * state + n] += dAcarry[k * state + n];
        if (dDd) dDd[k] += (float)dDacc[k];
        if (dbiasd) dbiasd[k] += (float)dbiasacc[k];
    }
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

/* Threads the passes really get: `threads` with OpenMP, one without (then the blocks need not shrink). */
static inline int effective_threads(int threads)
{
#ifdef _OPENMP
    return threads > 1 ? threads : 1;
#else
    (void)threads;
    return 1;
#endif
}

/* Channels per block: as many as CHANNEL_BLOCK allows, but at least two blocks per thread in all (when
 * the channels allow) so that the threads share the work evenly. */
static inline int64_t channel_block(int64_t batch, int64_t groups, int64_t heads, int threads)
{
    if (heads < 1) return 1;  /* no channels: no work units, but no division by zero either */
    int64_t blocks = (heads + CHANNEL_BLOCK - 1) / CHANNEL_BLOCK;
    while (threads > 1 && batch * groups * blocks < 2 * (int64_t)threads && blocks < heads) blocks++;
    return (heads + blocks - 1) / blocks;
}

/* A work unit of both passes: a batch element, a group and a block of up to `block` of the group's channels. */
struct work_unit {
    int64_t d0, nch;  /* first channel, channels */
    int64_t bd;       /* (batch, first channel) pair: index of its saved and last states */
    int64_t goff;     /* offset of the group's B, C (and dB, dC) */
    int64_t off;      /* offset of the first channel's u, delta, y (and gradients) */
};

static inline struct work_unit work_unit_at(int64_t unit, int64_t dim, int64_t length, int64_t state, int64_t groups,
                                            int64_t block, int64_t cs)
{
    const int64_t heads = dim / groups, blocks = (heads + block - 1) / block;
    const int64_t blk = unit % blocks, g = (unit / blocks) % groups, b = unit / (blocks * groups);
    struct work_unit w;
    w.d0 = g * heads + blk * block;
    w.nch = (heads - blk * block < block) ? heads - blk * block : block;
    w.bd = b * dim + w.d0;
    w.goff = (b * groups + g) * length * state;
    w.off = b * dim * length + w.d0 * cs;
    return w;
}

API void scan_forward(int64_t batch, int64_t dim, int64_t length, int64_t state, int64_t groups, int64_t chunk,
                      const float *restrict u, const float *restrict delta, const float *restrict bias, int softplus,
                      const float *restrict A, const float *restrict Bm, const float *restrict Cm,
                      const float *restrict Dskip, float *restrict y, float *restrict chunk_states,
                      float *restrict last_state, int channels_last, int threads)
{
    const int64_t heads = dim / groups;
    const int64_t nchunks = (length + chunk - 1) / chunk;
    const int nthreads = effective_threads(threads);
    const int64_t block = channel_block(batch, groups, heads, nthreads);
    const int64_t units = batch * groups * ((heads + block - 1) / block);
    const int64_t cs = channels_last ? 1 : length, ps = channels_last ? dim : 1;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        float *stage = malloc(sizeof(float) * (size_t)3 * block * chunk);
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < units; unit++) {
            const struct work_unit w = work_unit_at(unit, dim, length, state, groups, block, cs);
            DISPATCH_STATE(forward_block(st, w.nch, length, chunk, nchunks, cs, ps, u + w.off, delta + w.off,
                                         bias ? bias + w.d0 : NULL, softplus, A + w.d0 * state, Bm + w.goff,
                                         Cm + w.goff, Dskip ? Dskip + w.d0 : NULL, y + w.off,
                                         chunk_states + w.bd * nchunks * state, last_state + w.bd * state, stage))
        }
        free(stage);
    }
}

API void scan_backward(int64_t batch, int64_t dim, int64_t length, int64_t state, int64_t groups, int64_t chunk,
                       const float *restrict u, const float *restrict delta, const float *restrict bias, int softplus,
                       const float *restrict A, const float *restrict Bm, const float *restrict Cm,
                       const float *restrict Dskip, const float *restrict dy, const float *restrict dlast,
                       const float *restrict chunk_states, float *restrict du, float *restrict ddelta,
                       float *restrict dA, float *restrict dB, float *restrict dC, float *restrict dD,
                       float *restrict dbias, int channels_last, int threads)
{
    const int64_t heads = dim / groups;
    const int64_t nchunks = (length + chunk - 1) / chunk;
    const int64_t cs = channels_last ? 1 : length, ps = channels_last ? dim : 1;
    const int64_t bc_size = batch * groups * length * state;
    int nthreads = effective_threads(threads);
    const int64_t block = channel_block(batch, groups, heads, nthreads);
    const int64_t units = batch * groups * ((heads + block - 1) / block);
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
        float *stage = malloc(sizeof(float) * (size_t)6 * block * chunk);
        float *carry = malloc(sizeof(float) * (size_t)2 * CHANNEL_BLOCK * state);
#pragma omp for schedule(static)
        for (int64_t unit = 0; unit < units; unit++) {
            const struct work_unit w = work_unit_at(unit, dim, length, state, groups, block, cs);
            DISPATCH_STATE(backward_block(st, w.nch, length, chunk, nchunks, cs, ps, u + w.off, delta + w.off,
                                          bias ? bias + w.d0 : NULL, softplus, A + w.d0 * state, Bm + w.goff,
                                          Cm + w.goff, Dskip ? Dskip + w.d0 : NULL, dy + w.off,
                                          dlast ? dlast + w.bd * state : NULL, chunk_states + w.bd * nchunks * state,
                                          du + w.off, ddelta + w.off, mydA + w.d0 * state, mydB + w.goff,
                                          mydC + w.goff, (Dskip && mydD) ? mydD + w.d0 : NULL,
                                          (bias && mybias) ? mybias + w.d0 : NULL, hbuf, abuf, stage, carry))
        }
        free(hbuf); free(abuf); free(stage); free(carry);
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
