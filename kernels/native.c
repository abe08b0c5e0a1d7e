/* planc's native CPU block-sparse product, Y = X·Wᵀ + b, fp32 (kernels/native.py builds
 * and loads it; kernels/cpu.py's "native" strategy calls it).
 *
 * Why C: the torch formulations (kernels/cpu.py) issue one MKL GEMM per kept block. With
 * 32×32 blocks each such GEMM has K = 32, so every output element is loaded and stored
 * once per kept block for only 32 multiply-adds, and MKL packs its operands anew on every
 * call: on MiniLM at 90% those GEMMs ran at ~0.35 of the dense rate. Here a micro-tile of
 * TT tokens × r outputs stays in vector registers across every kept block of its
 * block-row, so each output is written once (a streaming store: no read of Y's lines
 * first), and nothing is packed per call: a block is stored transposed (c × r, one row of
 * r outputs per input feature), the order the loop reads.
 *
 * Threads split the tokens, each owning the rows of Y it writes (ctypes releases the GIL
 * for the call). X and Y are addressed through strides, so a row-major X or the
 * transposed view the other CPU paths return are read in place, and Y can be written
 * row-major or as Yᵀ.
 *
 * Plain C with GCC vector extensions, compiled on the machine that runs it
 * (-O3 -march=native): AVX-512 where the CPU has it, AVX2 or narrower otherwise.
 */
#include <stdint.h>
#if defined(__x86_64__) && (defined(__AVX512F__) || defined(__AVX__))
#include <immintrin.h>
#define HAVE_STREAM 1
#endif

#if defined(__AVX512F__)
#define VW 16
#define ACC_REGS 24
#else
#define VW 8
#define ACC_REGS 12
#endif

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));  /* unaligned access */

static inline vf load(const float *p) { return *(const vfu *)p; }
static inline void store(float *p, vf v) { *(vfu *)p = v; }

/* A store that bypasses the cache where the address is aligned: Y is written once and
 * not read here, and an ordinary store first reads each line of Y from memory. */
static inline void store_stream(float *p, vf v) {
#if defined(HAVE_STREAM) && VW == 16
    if (((uintptr_t)p & 63) == 0) { _mm512_stream_ps(p, (__m512)v); return; }
#elif defined(HAVE_STREAM) && VW == 8
    if (((uintptr_t)p & 31) == 0) { _mm256_stream_ps(p, (__m256)v); return; }
#endif
    store(p, v);
}

/* Token tile: X rows for TB tokens (all their features) are reused across every
 * block-row, so they should stay in L2 (64 × 1,536 fp32 = 384 KiB). */
#define TB 64

/* One micro-tile: tokens t .. t+TT-1 of block-row i; NV vectors of VW outputs = r. */
#define MICRO(NV, TT)                                                                        \
    static void micro_##NV##_##TT(const float *x, long st, long sf, long t, const float *wt, \
                                  const int64_t *col, int64_t b0, int64_t b1, int c,         \
                                  const float *bias, float *y, long yt, long yo) {           \
        vf acc[TT][NV];                                                                      \
        for (int v = 0; v < NV; v++) {                                                      \
            vf init = bias ? load(bias + v * VW) : (vf){0};                                  \
            for (int u = 0; u < TT; u++) acc[u][v] = init;                                   \
        }                                                                                    \
        const int r = NV * VW;                                                               \
        for (int64_t b = b0; b < b1; b++) {                                                  \
            const float *w = wt + b * (int64_t)c * r;                                        \
            const float *xb = x + t * st + col[b] * (int64_t)c * sf;                         \
            for (int k = 0; k < c; k++) {                                                    \
                vf wv[NV];                                                                   \
                for (int v = 0; v < NV; v++) wv[v] = load(w + k * r + v * VW);               \
                for (int u = 0; u < TT; u++) {                                               \
                    float xs = xb[u * st + k * sf];                                          \
                    for (int v = 0; v < NV; v++) acc[u][v] += xs * wv[v];                    \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        if (yo == 1) {                                                                       \
            for (int u = 0; u < TT; u++)                                                     \
                for (int v = 0; v < NV; v++)                                                 \
                    store_stream(y + (t + u) * yt + v * VW, acc[u][v]);                      \
        } else {                /* Yᵀ: each output's TT tokens are one contiguous run */   \
            float tile[TT][NV * VW];                                                         \
            for (int u = 0; u < TT; u++)                                                     \
                for (int v = 0; v < NV; v++) store(&tile[u][v * VW], acc[u][v]);             \
            for (int o = 0; o < NV * VW; o++) {                                              \
                float *dst = y + t * yt + o * yo;                                            \
                for (int u = 0; u < TT; u++) dst[u * yt] = tile[u][o];                       \
            }                                                                                \
        }                                                                                    \
    }

typedef void (*micro_fn)(const float *, long, long, long, const float *, const int64_t *, int64_t,
                         int64_t, int, const float *, float *, long, long);

#define KERNELS(NV) MICRO(NV, 1) MICRO(NV, 2) MICRO(NV, 4) MICRO(NV, 8) MICRO(NV, 3) MICRO(NV, 6)
KERNELS(1)
KERNELS(2)
KERNELS(4)
KERNELS(8)

static micro_fn pick(int nv, int tt) {
#define CASE(NV)                                   \
    if (nv == NV) {                                \
        if (tt == 8) return micro_##NV##_8;        \
        if (tt == 6) return micro_##NV##_6;        \
        if (tt == 4) return micro_##NV##_4;        \
        if (tt == 3) return micro_##NV##_3;        \
        if (tt == 2) return micro_##NV##_2;        \
        return micro_##NV##_1;                     \
    }
    CASE(1) CASE(2) CASE(4) CASE(8)
#undef CASE
    return 0;
}

/* The widest micro-tile that fits the accumulator registers. */
static int tile_tokens(int nv) {
    int tt = ACC_REGS / nv;
    if (tt >= 8) return 8;
    if (tt >= 6) return 6;
    if (tt >= 4) return 4;
    if (tt >= 3) return 3;
    if (tt >= 2) return 2;
    return 1;
}

/* The output block width this build handles (a multiple of its vector width, ≤ 8 vectors). */
int planc_native_supports(int r) {
    return r % VW == 0 && (r / VW == 1 || r / VW == 2 || r / VW == 4 || r / VW == 8);
}

int planc_native_vector_width(void) { return VW; }

/* Y[t, block-rows i0 .. i1-1] for tokens t0 .. t1-1, token tile by token tile. */
static void rows_range(const float *x, long st, long sf, long t0, long t1, const float *wt,
                       const int64_t *crow, const int64_t *col, long i0, long i1, int r, int c,
                       const float *bias, float *y, long yt, long yo) {
    const int nv = r / VW, tt = tile_tokens(nv);
    micro_fn full = pick(nv, tt), one = pick(nv, 1);
    for (long a = t0; a < t1; a += TB) {
        const long e = a + TB < t1 ? a + TB : t1;
        for (long i = i0; i < i1; i++) {
            const float *bi = bias ? bias + i * r : 0;
            float *yi = y + i * (long)r * yo;
            long t = a;
            if (crow[i] == crow[i + 1] && !bi) {           /* an all-pruned block-row: zeros */
                for (; t < e; t++)
                    for (int o = 0; o < r; o++) yi[t * yt + o * yo] = 0.0f;
                continue;
            }
            for (; t + tt <= e; t += tt) full(x, st, sf, t, wt, col, crow[i], crow[i + 1], c, bi, yi, yt, yo);
            for (; t < e; t++) one(x, st, sf, t, wt, col, crow[i], crow[i + 1], c, bi, yi, yt, yo);
        }
    }
#ifdef HAVE_STREAM
    _mm_sfence();                                         /* the streamed stores, visible to other threads */
#endif
}

/* Y = X·Wᵀ + b for tokens t0 .. t1-1. X[t, f] = x[t*st + f*sf], f < gc*c (the caller pads a
 * partial last block-column); Y[t, o] = y[t*yt + o*yo], o < gr*r (the caller pads a partial
 * last block-row). wt: the kept blocks in block-row order, each c × r (transposed); crow
 * (gr+1) and col (nnz) the block-row pointers and block-columns; bias (gr*r) or NULL.
 * Returns 0, or -1 if this build does not handle r.
 *
 * Split over `threads` OpenMP threads: by tokens (a multiple of 8 each) when every thread
 * gets at least a token tile, else by block-rows (few tokens: one decoding step, a small
 * batch); each output is computed by the same micro-tiles either way, so the result does
 * not depend on the split. The library links the libgomp torch has loaded (the same
 * soname), so these are torch's own OpenMP threads: threads of our own would share the
 * cores with torch's, which spin for a while after every parallel op (a 10 ms product
 * took 17 ms right after a torch op). */
int planc_bsr_rows_f32(const float *x, long st, long sf, long t0, long t1, const float *wt,
                       const int64_t *crow, const int64_t *col, long gr, int r, int c,
                       const float *bias, float *y, long yt, long yo, int threads) {
    if (!planc_native_supports(r)) return -1;
    if (threads < 1) threads = 1;
    const long n = t1 - t0;
    if (n >= (long)TB * threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int p = 0; p < threads; p++) {
            long a = t0 + ((n * p / threads + 7) / 8) * 8, e = t0 + ((n * (p + 1) / threads + 7) / 8) * 8;
            if (p == threads - 1 || e > t1) e = t1;
            if (a > t1) a = t1;
            if (e > a) rows_range(x, st, sf, a, e, wt, crow, col, 0, gr, r, c, bias, y, yt, yo);
        }
    } else {
        const int parts = threads < gr ? threads : (int)gr;
#pragma omp parallel for num_threads(parts > 0 ? parts : 1) schedule(static)
        for (int p = 0; p < parts; p++)
            rows_range(x, st, sf, t0, t1, wt, crow, col, gr * p / parts, gr * (p + 1) / parts, r, c, bias, y, yt, yo);
    }
    return 0;
}

/* ---- the training mask of a dense phase: W ⊙ expand(S) and its backward ---------------
 * W (gr·r × gc·c, row-major, contiguous), S (gr × gc) one scale per block. A step of a
 * SequentialAttention++ dense phase at small batch is bound by memory traffic over the
 * weight: the scaled copy is written with streaming stores (no read of its lines first),
 * and the backward reads the incoming gradient and the weight once, reducing each block's
 * ⟨G_b, W_b⟩ and writing G ⊙ expand(S) (streamed) in the same pass. Block-rows are
 * split over OpenMP threads. */

static inline void scale_row(const float *w, const float *s, float *out, long gc, int c) {
    for (long j = 0; j < gc; j++) {
        const float sj = s[j];
        const float *wj = w + j * c;
        float *oj = out + j * c;
        int k = 0;
        for (; k + VW <= c; k += VW) store_stream(oj + k, load(wj + k) * sj);
        for (; k < c; k++) oj[k] = wj[k] * sj;
    }
}

void planc_scale_blocks_f32(const float *w, const float *s, float *out, long gr, long gc, int r, int c,
                            int threads) {
    if (threads < 1) threads = 1;
    const long cols = gc * c;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long i = 0; i < gr; i++)
            for (int o = 0; o < r; o++) {
                const long row = (i * r + o) * cols;
                scale_row(w + row, s + i * gc, out + row, gc, c);
            }
#ifdef HAVE_STREAM
        _mm_sfence();                  /* each thread's streamed stores, before the region ends */
#endif
    }
}

/* gs[i, j] = Σ over block (i, j) of g ⊙ w; gw = g ⊙ expand(S) when gw is not NULL. */
void planc_scale_blocks_backward_f32(const float *g, const float *w, const float *s, float *gw, float *gs,
                                     long gr, long gc, int r, int c, int threads) {
    if (threads < 1) threads = 1;
    const long cols = gc * c;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long i = 0; i < gr; i++) {
            for (long j = 0; j < gc; j++) gs[i * gc + j] = 0.0f;
            for (int o = 0; o < r; o++) {
                const long row = (i * r + o) * cols;
                for (long j = 0; j < gc; j++) {
                    const float *gj = g + row + j * c, *wj = w + row + j * c;
                    vf acc = (vf){0};
                    float tail = 0.0f;
                    int k = 0;
                    for (; k + VW <= c; k += VW) acc += load(gj + k) * load(wj + k);
                    for (; k < c; k++) tail += gj[k] * wj[k];
                    for (int e = 0; e < VW; e++) tail += acc[e];
                    gs[i * gc + j] += tail;
                }
                if (gw) scale_row(g + row, s + i * gc, gw + row, gc, c);
            }
        }
#ifdef HAVE_STREAM
        _mm_sfence();                  /* each thread's streamed stores, before the region ends */
#endif
    }
}
