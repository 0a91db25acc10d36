/* Q4_0 x Q8_0 dot products for the CPU engine: ggml's Q4_0 weight blocks (fp16 scale d, 16 bytes of nibbles:
 * element i in the low nibble of byte i, element 16 + i in its high nibble, weight = d * (q - 8)) times
 * activations quantized per block of 32 to int8 with one fp32 scale (round to nearest, half away from zero),
 * what llama.cpp computes for a Q4_0 matrix. Each block's 32 products are summed exactly in integers, then scaled
 * by d_w * d_x in fp32.
 *
 * Plain C, no Python or torch API: loaded with ctypes (smallthinker_lab/engine/native.py), which releases the GIL
 * during a call, so callers may run row ranges of one product on several threads. An AVX2 path is chosen at run
 * time when the CPU has AVX2, FMA and F16C; otherwise a scalar path computes the same integer sums.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define ST_X86 1
#endif

#define QK 32
#define Q4_BLOCK 18 /* bytes: fp16 d, 16 bytes of nibbles */
#ifndef ST_PREFETCH
#define ST_PREFETCH 4608
#endif

static float fp16_to_fp32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            man &= 0x3ff;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* x (n floats, n a multiple of 32) -> q (n int8), d (n / 32 floats): per block d = max|x| / 127, q = round(x / d). */
void st_quantize_q8_0(const float *x, int64_t n, int8_t *q, float *d) {
    for (int64_t b = 0; b < n / QK; b++) {
        const float *xb = x + b * QK;
        float amax = 0.0f;
        for (int i = 0; i < QK; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
        }
        float db = amax / 127.0f, inv = db != 0.0f ? 1.0f / db : 0.0f;
        d[b] = db;
        for (int i = 0; i < QK; i++) q[b * QK + i] = (int8_t)roundf(xb[i] * inv);
    }
}

static void gemm_scalar(const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, int64_t nblocks,
                        int64_t ntok, const int8_t *qx_all, const float *dx_all, float *y_all, int64_t ldy) {
    for (int64_t t = 0; t < ntok; t++)
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *qx = qx_all + t * nblocks * QK;
        const float *dx = dx_all + t * nblocks;
        float *y = y_all + t * ldy;
        const uint8_t *row = w + r * row_bytes;
        float acc = 0.0f;
        for (int64_t b = 0; b < nblocks; b++) {
            const uint8_t *blk = row + b * Q4_BLOCK;
            uint16_t h;
            memcpy(&h, blk, 2);
            const int8_t *xb = qx + b * QK;
            int32_t s = 0;
            for (int i = 0; i < 16; i++) {
                s += ((int)(blk[2 + i] & 0x0f) - 8) * xb[i];
                s += ((int)(blk[2 + i] >> 4) - 8) * xb[16 + i];
            }
            acc += fp16_to_fp32(h) * dx[b] * (float)s;
        }
        y[r] = acc;
    }
}

/* The correction terms block_dot subtracts: per block of 32 activations, 8 lanes of 8 x the sum of 4. */
static void q8_corr(const int8_t *q, int64_t nblocks, int32_t *corr) {
    for (int64_t i = 0; i < nblocks; i++)
        for (int l = 0; l < 8; l++) {
            const int8_t *xb = q + i * QK + 4 * l;
            corr[i * 8 + l] = 8 * (xb[0] + xb[1] + xb[2] + xb[3]);
        }
}

#ifdef ST_X86
/* One row-block's 8 partial sums (int32 lanes, as floats): the nibbles taken unsigned (0..15) times the activation
 * bytes, minus 8 x the activations' sums (corr, precomputed per block): sum (q - 8) y, exact in integers. */
__attribute__((target("avx2,fma,f16c"))) static inline __m256 block_dot(const uint8_t *blk, __m256i qy, __m256i corr) {
    __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 2));
    __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
    __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, qy), _mm256_set1_epi16(1));
    return _mm256_cvtepi32_ps(_mm256_sub_epi32(p, corr));
}

__attribute__((target("avx2,fma,f16c"))) static inline float row_dot(const uint8_t *row, int64_t nblocks,
                                                                      const int8_t *qx, const float *dx,
                                                                      const int32_t *corr) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(); /* two chains: the FMA latency halves */
    int64_t b = 0;
    for (; b + 1 < nblocks; b += 2) {
        const uint8_t *b0 = row + b * Q4_BLOCK, *b1 = b0 + Q4_BLOCK;
        _mm_prefetch((const char *)(b0 + ST_PREFETCH), _MM_HINT_T0);
        uint16_t h0, h1;
        memcpy(&h0, b0, 2);
        memcpy(&h1, b1, 2);
        __m256 p0 = block_dot(b0, _mm256_loadu_si256((const __m256i *)(qx + b * QK)),
                              _mm256_loadu_si256((const __m256i *)(corr + b * 8)));
        __m256 p1 = block_dot(b1, _mm256_loadu_si256((const __m256i *)(qx + (b + 1) * QK)),
                              _mm256_loadu_si256((const __m256i *)(corr + (b + 1) * 8)));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(h0) * dx[b]), p0, acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(h1) * dx[b + 1]), p1, acc1);
    }
    if (b < nblocks) {
        const uint8_t *b0 = row + b * Q4_BLOCK;
        uint16_t h0;
        memcpy(&h0, b0, 2);
        __m256 p0 = block_dot(b0, _mm256_loadu_si256((const __m256i *)(qx + b * QK)),
                              _mm256_loadu_si256((const __m256i *)(corr + b * 8)));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(h0) * dx[b]), p0, acc0);
    }
    __m256 acc = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) static void gemm_avx2(const uint8_t *w, int64_t row_bytes, int64_t r0,
                                                               int64_t r1, int64_t nblocks, int64_t ntok,
                                                               const int8_t *qx, const float *dx, float *y,
                                                               int64_t ldy) {
    /* per token and block: 8 lanes of 8 x (the sum of the 4 activations that lane's madd adds) */
    int32_t corr[ntok * nblocks * 8];
    q8_corr(qx, ntok * nblocks, corr);
    /* one row at a time (measured faster than 2 or 4 rows interleaved), every token on it while it is in L1 */
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + r * row_bytes;
        for (int64_t t = 0; t < ntok; t++)
            y[t * ldy + r] = row_dot(row, nblocks, qx + t * nblocks * QK, dx + t * nblocks, corr + t * nblocks * 8);
    }
}
#endif

/* ------------------------------------------------------------------ rows interleaved by 8 ("q4_0x8")
 * The same Q4_0 blocks, reordered: rows in groups of 8, and per group and block column b, the 8 rows' fp16 scales
 * (16 bytes) then their 8 x 16 bytes of nibbles (144 bytes, the size of 8 blocks). One pass computes 8 rows: the
 * activation block is loaded once for them, their 8 integer sums are reduced into one vector and scaled by the 8
 * scales at once (no per-row horizontal sum), and the weights are read as one sequential stream. */
#define X8_GROUP 144

static void gemm_x8_scalar(const uint8_t *w, int64_t g0, int64_t g1, int64_t nblocks, int64_t ntok,
                           const int8_t *qx_all, const float *dx_all, float *y_all, int64_t ldy) {
    for (int64_t g = g0; g < g1; g++)
        for (int64_t t = 0; t < ntok; t++) {
            const int8_t *qx = qx_all + t * nblocks * QK;
            const float *dx = dx_all + t * nblocks;
            for (int r = 0; r < 8; r++) {
                float acc = 0.0f;
                for (int64_t b = 0; b < nblocks; b++) {
                    const uint8_t *blk = w + (g * nblocks + b) * X8_GROUP, *qs = blk + 16 + 16 * r;
                    uint16_t h;
                    memcpy(&h, blk + 2 * r, 2);
                    const int8_t *xb = qx + b * QK;
                    int32_t s = 0;
                    for (int i = 0; i < 16; i++) {
                        s += ((int)(qs[i] & 0x0f) - 8) * xb[i];
                        s += ((int)(qs[i] >> 4) - 8) * xb[16 + i];
                    }
                    acc += fp16_to_fp32(h) * dx[b] * (float)s;
                }
                y_all[t * ldy + g * 8 + r] = acc;
            }
        }
}

/* 8 x each activation block's sum (what the unsigned nibbles add beyond q - 8), per block of n blocks. */
static void x8_bsum(const int8_t *q, int64_t n, int32_t *bsum) {
    for (int64_t i = 0; i < n; i++) {
        int32_t s = 0;
        for (int j = 0; j < QK; j++) s += q[i * QK + j];
        bsum[i] = 8 * s;
    }
}

#ifdef ST_X86
/* The 8 rows of one group (its nblocks x 144 bytes at grp) times one Q8_0 token: out[0..7]. */
__attribute__((target("avx2,fma,f16c"))) static inline void x8_group_avx2(const uint8_t *grp, int64_t nblocks,
                                                                          const int8_t *qx, const float *dx,
                                                                          const int32_t *bs, float *out) {
    const __m256i m4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblocks; b++) {
        const uint8_t *blk = grp + b * X8_GROUP;
        _mm_prefetch((const char *)(blk + ST_PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + ST_PREFETCH + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(blk + ST_PREFETCH + 128), _MM_HINT_T0);
        __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)blk));
        __m256i qy = _mm256_loadu_si256((const __m256i *)(qx + b * QK));
        __m256i p[8];
        for (int r = 0; r < 8; r++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(blk + 16 + 16 * r));
            __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
            p[r] = _mm256_madd_epi16(_mm256_maddubs_epi16(q, qy), ones);
        }
        __m256i s01 = _mm256_hadd_epi32(p[0], p[1]), s23 = _mm256_hadd_epi32(p[2], p[3]);
        __m256i s45 = _mm256_hadd_epi32(p[4], p[5]), s67 = _mm256_hadd_epi32(p[6], p[7]);
        __m256i s03 = _mm256_hadd_epi32(s01, s23), s47 = _mm256_hadd_epi32(s45, s67);
        __m256i s = _mm256_add_epi32(_mm256_permute2x128_si256(s03, s47, 0x20),
                                     _mm256_permute2x128_si256(s03, s47, 0x31)); /* rows 0..7 */
        s = _mm256_sub_epi32(s, _mm256_set1_epi32(bs[b]));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(dx[b])), _mm256_cvtepi32_ps(s), acc);
    }
    _mm256_storeu_ps(out, acc);
}

__attribute__((target("avx2,fma,f16c"))) static void gemm_x8_avx2(const uint8_t *w, int64_t g0, int64_t g1,
                                                                  int64_t nblocks, int64_t ntok, const int8_t *qx,
                                                                  const float *dx, float *y, int64_t ldy) {
    int32_t bsum[ntok * nblocks];
    x8_bsum(qx, ntok * nblocks, bsum);
    for (int64_t g = g0; g < g1; g++)
        for (int64_t t = 0; t < ntok; t++)
            x8_group_avx2(w + g * nblocks * X8_GROUP, nblocks, qx + t * nblocks * QK, dx + t * nblocks,
                          bsum + t * nblocks, y + t * ldy + g * 8);
}
#endif

/* One group of 8 rows times one token, on the path simd names (bs: x8_bsum of qx, read by the AVX2 path). */
static void x8_group(const uint8_t *grp, int64_t nblocks, const int8_t *qx, const float *dx, const int32_t *bs,
                     float *out, int simd) {
#ifdef ST_X86
    if (simd) {
        x8_group_avx2(grp, nblocks, qx, dx, bs, out);
        return;
    }
#endif
    (void)bs;
    (void)simd;
    float y[8];
    gemm_x8_scalar(grp, 0, 1, nblocks, 1, qx, dx, y, 8);
    memcpy(out, y, sizeof(y));
}

/* y[t, r] for the rows of groups g0 <= g < g1 (rows 8 g0 .. 8 g1 - 1) of a q4_0x8 matrix of nblocks block columns
 * and ntok Q8_0 tokens; the arguments otherwise as st_q4_0_gemm's. */
void st_q4_0x8_gemm(const uint8_t *w, int64_t g0, int64_t g1, int64_t nblocks, int64_t ntok, const int8_t *qx,
                    const float *dx, float *y, int64_t ldy, int simd) {
#ifdef ST_X86
    if (simd) {
        gemm_x8_avx2(w, g0, g1, nblocks, ntok, qx, dx, y, ldy);
        return;
    }
#endif
    (void)simd;
    gemm_x8_scalar(w, g0, g1, nblocks, ntok, qx, dx, y, ldy);
}

/* 1 when the AVX2 path runs, 0 for the scalar one. */
int st_q4_0_simd(void) {
#ifdef ST_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

/* y[t, r] = sum_c W[r, c] x[t, c] for rows r0 <= r < r1 of a Q4_0 matrix W (rows of row_bytes = nblocks * 18
 * bytes) and ntok tokens x given as Q8_0 blocks (qx: ntok x nblocks x 32 int8, dx: ntok x nblocks floats); y's
 * rows are ldy floats apart. simd: the value of st_q4_0_simd() (the caller reads it once). */
void st_q4_0_gemm(const uint8_t *w, int64_t row_bytes, int64_t r0, int64_t r1, int64_t nblocks, int64_t ntok,
                  const int8_t *qx, const float *dx, float *y, int64_t ldy, int simd) {
#ifdef ST_X86
    if (simd) {
        gemm_avx2(w, row_bytes, r0, r1, nblocks, ntok, qx, dx, y, ldy);
        return;
    }
#endif
    (void)simd;
    gemm_scalar(w, row_bytes, r0, r1, nblocks, ntok, qx, dx, y, ldy);
}

/* ------------------------------------------------------------------ rows split over threads */
#include <pthread.h>

typedef struct {
    const uint8_t *w;
    int64_t row_bytes, r0, r1, nblocks, ntok, ldy;
    const int8_t *qx;
    const float *dx;
    float *y;
    int simd, x8; /* x8: w is q4_0x8 and r0, r1 count groups of 8 rows */
} gemm_job;

static void *gemm_thread(void *arg) {
    gemm_job *j = (gemm_job *)arg;
    if (j->x8)
        st_q4_0x8_gemm(j->w, j->r0, j->r1, j->nblocks, j->ntok, j->qx, j->dx, j->y, j->ldy, j->simd);
    else
        st_q4_0_gemm(j->w, j->row_bytes, j->r0, j->r1, j->nblocks, j->ntok, j->qx, j->dx, j->y, j->ldy, j->simd);
    return NULL;
}

#define MAX_THREADS 64
/* fn(jobs + i * size) for 0 <= i < n: threads started for shares 1..n-1 (no pool to keep or leak), the caller
 * computing share 0; a share whose thread could not start runs on the caller. Returns the threads that ran. */
static int run_shares(void *(*fn)(void *), void *jobs, size_t size, int n) {
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0}, ran = 1;
    for (int i = 1; i < n; i++) {
        started[i] = pthread_create(&tid[i], NULL, fn, (char *)jobs + i * size) == 0;
        ran += started[i];
    }
    fn(jobs);
    for (int i = 1; i < n; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            fn((char *)jobs + i * size);
    }
    return ran;
}

static int gemm_split(const gemm_job *proto, int64_t units, int nthreads) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads < 1) nthreads = 1;
    gemm_job jobs[MAX_THREADS];
    for (int i = 0; i < nthreads; i++) {
        jobs[i] = *proto;
        jobs[i].r0 = units * i / nthreads;
        jobs[i].r1 = units * (i + 1) / nthreads;
    }
    return run_shares(gemm_thread, jobs, sizeof(gemm_job), nthreads);
}

/* st_q4_0_gemm over rows 0..rows-1 with the rows split in nthreads contiguous shares: nthreads - 1 threads started
 * for this call (no pool to keep or leak), the caller computing the first share. Returns the threads that ran
 * (fewer when one could not start: its share then runs on the caller). */
int st_q4_0_gemm_mt(const uint8_t *w, int64_t row_bytes, int64_t rows, int64_t nblocks, int64_t ntok,
                    const int8_t *qx, const float *dx, float *y, int64_t ldy, int simd, int nthreads) {
    gemm_job proto = {w, row_bytes, 0, 0, nblocks, ntok, ldy, qx, dx, y, simd, 0};
    return gemm_split(&proto, rows, nthreads);
}

/* st_q4_0_gemm_mt for a q4_0x8 matrix of rows (a multiple of 8) rows: the groups of 8 split over the threads. */
int st_q4_0x8_gemm_mt(const uint8_t *w, int64_t rows, int64_t nblocks, int64_t ntok, const int8_t *qx,
                      const float *dx, float *y, int64_t ldy, int simd, int nthreads) {
    gemm_job proto = {w, nblocks * Q4_BLOCK, 0, 0, nblocks, ntok, ldy, qx, dx, y, simd, 1};
    return gemm_split(&proto, rows / 8, nthreads);
}

/* ------------------------------------------------------------------ one token through a layer's experts */
/* One row of a Q4_0 matrix times one Q8_0 activation vector. */
static float dot_one(const uint8_t *row, int64_t nblocks, const int8_t *qx, const float *dx, const int32_t *corr,
                     int simd) {
#ifdef ST_X86
    if (simd) return row_dot(row, nblocks, qx, dx, corr);
#endif
    (void)corr;
    (void)simd;
    float y;
    gemm_scalar(row, nblocks * Q4_BLOCK, 0, 1, nblocks, 1, qx, dx, &y, 1);
    return y;
}

typedef struct {
    const uint8_t *const *gate, *const *up, *const *down;
    const float *w;
    int64_t f, h, j0, j1;
    const int8_t *qx;
    const float *dx;
    const int32_t *corr;
    float *y;       /* h floats: this share's sum, zeroed by the caller */
    int64_t *active; /* per expert: neurons with gate > 0 */
    float *g_out;   /* NULL, or k x f: the gate products */
    int simd, x8;   /* x8: the three matrices in the q4_0x8 layout */
    const int32_t *bsum; /* x8: x8_bsum of qx */
} moe_job;

/* Experts j0 <= j < j1 of one token: g = gate x, a = relu(g) * (up x) with up's rows read only where g > 0 (a is 0
 * elsewhere: the same a), a in Q8_0, y += w_j * (down a). */
static void moe_share_x8(const moe_job *m);

static void moe_share(const moe_job *m) {
    if (m->x8) {
        moe_share_x8(m);
        return;
    }
    const int64_t f = m->f, h = m->h, nbh = h / QK, nbf = f / QK;
    const int64_t rowh = nbh * Q4_BLOCK, rowf = nbf * Q4_BLOCK;
    float g[f], a[f], da[nbf];
    int8_t qa[f];
    int32_t corra[nbf * 8];
    for (int64_t j = m->j0; j < m->j1; j++) {
        const uint8_t *gw = m->gate[j], *uw = m->up[j], *dw = m->down[j];
        for (int64_t r = 0; r < f; r++) g[r] = dot_one(gw + r * rowh, nbh, m->qx, m->dx, m->corr, m->simd);
        int64_t n = 0;
        for (int64_t r = 0; r < f; r++) {
            if (g[r] > 0.0f) {
                a[r] = g[r] * dot_one(uw + r * rowh, nbh, m->qx, m->dx, m->corr, m->simd);
                n++;
            } else {
                a[r] = 0.0f;
            }
        }
        if (m->g_out) memcpy(m->g_out + j * f, g, (size_t)f * sizeof(float));
        m->active[j] = n;
        if (n == 0) continue;
        st_quantize_q8_0(a, f, qa, da);
        q8_corr(qa, nbf, corra);
        const float wj = m->w[j];
        for (int64_t r = 0; r < h; r++) m->y[r] += wj * dot_one(dw + r * rowf, nbf, qa, da, corra, m->simd);
    }
}

/* moe_share on q4_0x8 records: gate and down 8 rows a pass; up's groups of 8 read only where one of their gates
 * is > 0 (a is 0 for the others' neurons, as in the row layout). */
static void moe_share_x8(const moe_job *m) {
    const int64_t f = m->f, h = m->h, nbh = h / QK, nbf = f / QK;
    const int64_t gh = nbh * X8_GROUP, gf = nbf * X8_GROUP;
    float g[f], a[f], da[nbf], u[8], yd[8];
    int8_t qa[f];
    int32_t bsa[nbf];
    for (int64_t j = m->j0; j < m->j1; j++) {
        const uint8_t *gw = m->gate[j], *uw = m->up[j], *dw = m->down[j];
        for (int64_t gi = 0; gi < f / 8; gi++) x8_group(gw + gi * gh, nbh, m->qx, m->dx, m->bsum, g + 8 * gi, m->simd);
        int64_t n = 0;
        for (int64_t gi = 0; gi < f / 8; gi++) {
            const float *gg = g + 8 * gi;
            int any = 0;
            for (int r = 0; r < 8; r++) any |= gg[r] > 0.0f;
            if (any) x8_group(uw + gi * gh, nbh, m->qx, m->dx, m->bsum, u, m->simd);
            for (int r = 0; r < 8; r++) {
                if (gg[r] > 0.0f) {
                    a[8 * gi + r] = gg[r] * u[r];
                    n++;
                } else {
                    a[8 * gi + r] = 0.0f;
                }
            }
        }
        if (m->g_out) memcpy(m->g_out + j * f, g, (size_t)f * sizeof(float));
        m->active[j] = n;
        if (n == 0) continue;
        st_quantize_q8_0(a, f, qa, da);
        x8_bsum(qa, nbf, bsa);
        const float wj = m->w[j];
        for (int64_t gi = 0; gi < h / 8; gi++) {
            x8_group(dw + gi * gf, nbf, qa, da, bsa, yd, m->simd);
            for (int r = 0; r < 8; r++) m->y[8 * gi + r] += wj * yd[r];
        }
    }
}

static void *moe_thread(void *arg) {
    moe_share((const moe_job *)arg);
    return NULL;
}

/* y (h floats) += sum_j w[j] * down_j(relu(gate_j x) * up_j x) over k ReGLU experts of Q4_0 records (gate_j, up_j:
 * (f, h) quantized along h; down_j: (h, f), the model's layout, quantized along f) for one token x (h floats,
 * quantized once to Q8_0). active[j]: the neurons of expert j with gate > 0; g_out (NULL or k x f floats): the gate
 * products. The experts are split in contiguous shares over nthreads (threads started for this call, the caller
 * computing the first share); the shares' sums are added to y in share order, so the result does not depend on
 * which thread finishes first. f and h are multiples of 32 and at most 16384 (checked by the caller). x8: the
 * records are q4_0x8 (gate, up, down each rows interleaved by 8). Returns the threads that ran. */
int st_moe_q4_0(int64_t k, const uint8_t *const *gate, const uint8_t *const *up, const uint8_t *const *down,
                const float *w, int64_t f, int64_t h, const float *x, float *y, int64_t *active, float *g_out,
                int simd, int nthreads, int x8) {
    const int64_t nbh = h / QK;
    int8_t qx[h];
    float dx[nbh];
    int32_t corr[nbh * 8], bsum[nbh];
    st_quantize_q8_0(x, h, qx, dx);
    q8_corr(qx, nbh, corr);
    x8_bsum(qx, nbh, bsum);
    if (nthreads > k) nthreads = (int)k;
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads < 1) nthreads = 1;
    moe_job jobs[MAX_THREADS];
    float *parts = nthreads > 1 ? (float *)calloc((size_t)(nthreads - 1) * h, sizeof(float)) : NULL;
    if (nthreads > 1 && parts == NULL) nthreads = 1;
    for (int i = 0; i < nthreads; i++)
        jobs[i] = (moe_job){gate, up, down, w, f, h, k * i / nthreads, k * (i + 1) / nthreads, qx, dx, corr,
                            i == 0 ? y : parts + (size_t)(i - 1) * h, active, g_out, simd, x8, bsum};
    int ran = run_shares(moe_thread, jobs, sizeof(moe_job), nthreads);
    for (int i = 1; i < nthreads; i++) { /* in share order: the sum does not depend on which thread ended first */
        const float *p = parts + (size_t)(i - 1) * h;
        for (int64_t r = 0; r < h; r++) y[r] += p[r];
    }
    free(parts);
    return ran;
}
