// Backward pass of cosine-similarity attention (FlashAttention-2 style, no running maximum:
// P is recomputed from the saved log-sum-exp).
//
//   attn_bwd_dot:    D[r] = <dout_r, out_r> in fp32.
//   attn_bwd_kv_tc:  f16/bf16 tensor cores. One block per (key tile, kv head, batch); it loops the
//                    query heads of its group and the query tiles, accumulates dV and dK_hat in
//                    registers (so GQA needs no atomics), optionally adds dQ_hat into an fp32
//                    buffer with atomics, and writes dbias.
//   attn_bwd_dq_tc:  f16/bf16, one block per (query tile, head, batch) looping key tiles in a fixed
//                    order: dQ_hat without atomics (deterministic mode).
//   attn_bwd_kv_f32 / attn_bwd_dq_f32: the same two passes on CUDA cores for fp32 inputs.
//
// All tensors are contiguous (b, heads, n, d) except bias/dbias, which take element strides
// (0 on a broadcast dimension). Offsets are 64-bit.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// NVRTC has no <stdint.h> without extra include paths; these are all the kernels need.
typedef unsigned int uint32_t;
typedef long long int64_t;

namespace cbwd {

constexpr float LOG2E = 1.4426950408889634f;
#define CBWD_INF __int_as_float(0x7f800000)

// dbias modes: what the kernel does with dS at (r, c).
constexpr int DB_NONE = 0;     // no bias gradient
constexpr int DB_STORE_T = 1;  // full bias: each element has one writer, store in the input dtype
constexpr int DB_ATOMIC = 2;   // broadcast bias: fp32 atomicAdd (fast mode)
constexpr int DB_STORE_F = 3;  // broadcast bias, deterministic: store fp32 into a full buffer

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ uint32_t saddr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :: "r"(saddr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n"); }
__device__ __forceinline__ void cp_wait_all() { asm volatile("cp.async.wait_group 0;\n"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(saddr(p)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(saddr(p)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(saddr(p)));
}

// D += A(16x16 row) * B(16x8 col), fp32 accumulators.
template <typename T> __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4],
                                                          uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                               uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// rows x DP tile of a row-major (n, d) matrix into smem (row stride SROW), zero-filling rows
// >= n_valid and columns >= d, so padded rows/columns contribute exact zeros to every product.
template <int ROWS, int DP, int SROW, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* s, const T* g, int n_valid, int d) {
    constexpr int EPC = 16 / sizeof(T);  // elements per 16-byte chunk
    constexpr int CH = DP / EPC;
    for (int idx = threadIdx.x; idx < ROWS * CH; idx += THREADS) {
        int r = idx / CH, col = (idx % CH) * EPC;
        int valid = (r < n_valid) ? max(0, min(EPC, d - col)) : 0;
        const T* src = valid > 0 ? g + (int64_t)r * d + col : g;
        cp_async16(s + r * SROW + col, src, valid * (int)sizeof(T));
    }
}

// Causal rule (bottom-right): query row r sees key c iff c <= r + (j - i).
__device__ __forceinline__ bool visible(int r, int c, int i, int j, bool causal,
                                        const unsigned char* mrow) {
    if (r >= i || c >= j) return false;
    if (causal && c > r + (j - i)) return false;
    return mrow == nullptr || mrow[c] != 0;
}

// lse in log2 units; rows with no visible key (lse = -inf) get +inf so exp2(x - inf) = 0.
__device__ __forceinline__ float lse2_of(float lse) {
    return lse == -CBWD_INF ? CBWD_INF : lse * LOG2E;
}

struct Params {
    const void* q;      // qhat (b, h, i, d)
    const void* k;      // khat (b, hk, j, d)
    const void* v;      // (b, hk, j, d)
    const void* dout;   // (b, h, i, d)
    const float* lse;   // (b, h, i)
    const float* dsum;  // D (b, h, i)
    const unsigned char* mask;  // (b, j) or null
    const void* bias;   // element strides below; null if none
    int64_t bs_b, bs_h, bs_i, bs_j;  // bias element strides, 0 on broadcast dims
    void* dbias;        // dtype per dbias_mode
    int64_t ds_b, ds_h, ds_i, ds_j;
    float* dq;          // fp32 (b, h, i, d): atomics (kv kernel) or plain stores (dq kernel)
    float* dk;          // fp32 dk_hat (b, hk, j, d)
    void* dv;           // (b, hk, j, d) in the input dtype
    int b, h, hk, i, j, d;
    float scale;
    int causal;
    int dbias_mode;
    int dq_atomic;      // kv kernel: also accumulate dQ with atomics
};

template <typename T>
__device__ __forceinline__ float bias_at(const Params& p, int bi, int hq, int r, int c) {
    const T* bp = reinterpret_cast<const T*>(p.bias);
    return to_f(bp[bi * p.bs_b + hq * p.bs_h + (int64_t)r * p.bs_i + (int64_t)c * p.bs_j]);
}

template <typename T>
__device__ __forceinline__ void put_dbias(const Params& p, int bi, int hq, int r, int c, float ds) {
    int64_t off = bi * p.ds_b + hq * p.ds_h + (int64_t)r * p.ds_i + (int64_t)c * p.ds_j;
    if (p.dbias_mode == DB_STORE_T) reinterpret_cast<T*>(p.dbias)[off] = from_f<T>(ds);
    else if (p.dbias_mode == DB_ATOMIC) atomicAdd(reinterpret_cast<float*>(p.dbias) + off, ds);
    else reinterpret_cast<float*>(p.dbias)[off] = ds;
}

// ---------------------------------------------------------------------------------------------
// D = rowsum(dout * out), one warp per row.
template <typename T>
__device__ __forceinline__ void dot_rows(const T* dout, const T* out, float* dsum, int64_t rows,
                                         int d) {
    int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* a = dout + row * d;
    const T* o = out + row * d;
    float acc = 0.f;
    for (int c = lane; c < d; c += 32) acc += to_f(a[c]) * to_f(o[c]);
    for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    if (lane == 0) dsum[row] = acc;
}

// ---------------------------------------------------------------------------------------------
// Tensor-core dK/dV kernel. Warp w: key rows 16*(w % WR) of the tile; phase A columns
// (w / WR) * (BM / WC) of the query tile; phase B d columns (w / WR) * (DP / WC).
template <int DP, typename T, int BN, int BM, int WC>
struct KvCfg {
    static constexpr int WR = BN / 16;
    static constexpr int NW = WR * WC;
    static constexpr int THREADS = NW * 32;
    static constexpr int SROW = DP + 8;     // +16 bytes: conflict-free ldmatrix rows
    static constexpr int PROW = BM + 8;
    static constexpr int SMEM = (2 * BN * SROW + 2 * BM * SROW + 2 * BN * PROW) * sizeof(T) +
                                2 * BM * sizeof(float);
    static constexpr int QR = BM / 16;      // dQ phase: query row groups
    static constexpr int QC = NW / QR;      // dQ phase: column splits
};

template <int DP, typename T, int BN, int BM, int WC>
__device__ __forceinline__ void kv_tc(const Params& p) {
    using C = KvCfg<DP, T, BN, BM, WC>;
    constexpr int SROW = C::SROW, PROW = C::PROW, WR = C::WR;
    constexpr int QA = BM / WC;          // phase A query columns per warp
    constexpr int NTA = QA / 8;
    constexpr int DB = DP / WC;          // phase B d columns per warp
    constexpr int NTB = DB / 8;
    constexpr int DQ = DP / C::QC;       // dQ phase d columns per warp
    constexpr int NTQ = DQ / 8;
    static_assert(QA % 16 == 0, "phase A columns must be whole k16 steps");
    static_assert(DB % 8 == 0 && DQ % 8 == 0, "d split");

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BN * SROW;
    T* sQ = sV + BN * SROW;
    T* sO = sQ + BM * SROW;       // dout
    T* sP = sO + BM * SROW;       // P^T  [key][query]
    T* sS = sP + BN * PROW;       // dS^T [key][query]
    float* sL = reinterpret_cast<float*>(sS + BN * PROW);  // lse2
    float* sD = sL + BM;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int wr = warp % WR, wc = warp / WR;
    const int c0 = blockIdx.x * BN;
    const int kh = blockIdx.y, bi = blockIdx.z;
    const int i = p.i, j = p.j, d = p.d;
    const int rep = p.h / p.hk;

    const int64_t kvoff = ((int64_t)bi * p.hk + kh) * j * d + (int64_t)c0 * d;
    load_tile<BN, DP, SROW, C::THREADS>(sK, reinterpret_cast<const T*>(p.k) + kvoff, j - c0, d);
    load_tile<BN, DP, SROW, C::THREADS>(sV, reinterpret_cast<const T*>(p.v) + kvoff, j - c0, d);
    cp_commit();
    const unsigned char* mrow = p.mask ? p.mask + (int64_t)bi * j : nullptr;

    float accV[NTB][4], accK[NTB][4];
#pragma unroll
    for (int n = 0; n < NTB; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) accV[n][e] = accK[n][e] = 0.f;

    // First query row that sees any key of this tile (causal), as a tile index.
    int r_first = 0;
    if (p.causal) r_first = max(0, c0 - (j - i));
    const int t_first = r_first / BM;
    const int ntiles = (i + BM - 1) / BM;

    for (int hq = kh * rep; hq < (kh + 1) * rep; ++hq) {
        const int64_t qbase = ((int64_t)bi * p.h + hq) * i;
        for (int qt = t_first; qt < ntiles; ++qt) {
            const int r0 = qt * BM;
            __syncthreads();  // previous tile's smem readers are done
            load_tile<BM, DP, SROW, C::THREADS>(sQ, reinterpret_cast<const T*>(p.q) + (qbase + r0) * d,
                                                i - r0, d);
            load_tile<BM, DP, SROW, C::THREADS>(sO, reinterpret_cast<const T*>(p.dout) + (qbase + r0) * d,
                                                i - r0, d);
            cp_commit();
            for (int x = tid; x < BM; x += C::THREADS) {
                int r = r0 + x;
                sL[x] = r < i ? lse2_of(p.lse[qbase + r]) : CBWD_INF;
                sD[x] = r < i ? p.dsum[qbase + r] : 0.f;
            }
            cp_wait_all();
            __syncthreads();

            // Phase A: S^T = K Q^T and dP^T = V dO^T for 16 keys x QA queries.
            float aS[NTA][4], aP[NTA][4];
#pragma unroll
            for (int n = 0; n < NTA; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) aS[n][e] = aP[n][e] = 0.f;
            const int kr0 = wr * 16, qc0 = wc * QA;
#pragma unroll 2
            for (int k0 = 0; k0 < DP; k0 += 16) {
                uint32_t ak[4], av[4];
                ldsm_x4(ak, sK + (kr0 + (lane & 15)) * SROW + k0 + (lane >> 4) * 8);
                ldsm_x4(av, sV + (kr0 + (lane & 15)) * SROW + k0 + (lane >> 4) * 8);
#pragma unroll
                for (int np = 0; np < NTA / 2; ++np) {
                    int row = qc0 + np * 16 + (lane & 7) + (lane >> 4) * 8;
                    int col = k0 + ((lane >> 3) & 1) * 8;
                    uint32_t bq[4], bo[4];
                    ldsm_x4(bq, sQ + row * SROW + col);
                    ldsm_x4(bo, sO + row * SROW + col);
                    mma<T>(aS[2 * np], ak, bq[0], bq[1]);
                    mma<T>(aS[2 * np + 1], ak, bq[2], bq[3]);
                    mma<T>(aP[2 * np], av, bo[0], bo[1]);
                    mma<T>(aP[2 * np + 1], av, bo[2], bo[3]);
                }
            }
            // P and dS elementwise; store transposed tiles (key-major) for phase B.
#pragma unroll
            for (int n = 0; n < NTA; ++n) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const int kl = kr0 + g + hh * 8;
                    const int c = c0 + kl;
                    float pv[2], dv[2];
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int ql = qc0 + n * 8 + 2 * t4 + e;
                        const int r = r0 + ql;
                        float pr = 0.f, ds = 0.f;
                        if (visible(r, c, i, j, p.causal, mrow)) {
                            float s = p.scale * aS[n][hh * 2 + e];
                            if (p.bias) s += bias_at<T>(p, bi, hq, r, c);
                            pr = exp2f(s * LOG2E - sL[ql]);
                            ds = pr * (aP[n][hh * 2 + e] - sD[ql]);
                        }
                        if (p.dbias_mode != DB_NONE && r < i && c < j) put_dbias<T>(p, bi, hq, r, c, ds);
                        pv[e] = pr;
                        dv[e] = ds;
                    }
                    const int ql = qc0 + n * 8 + 2 * t4;
                    *reinterpret_cast<uint32_t*>(sP + kl * PROW + ql) = pack2<T>(pv[0], pv[1]);
                    *reinterpret_cast<uint32_t*>(sS + kl * PROW + ql) = pack2<T>(dv[0], dv[1]);
                }
            }
            __syncthreads();

            // Phase B: dV += P^T dO, dK += dS^T Q for 16 keys x DB columns.
            const int dc0 = wc * DB;
#pragma unroll 2
            for (int k0 = 0; k0 < BM; k0 += 16) {
                uint32_t ap[4], as[4];
                ldsm_x4(ap, sP + (kr0 + (lane & 15)) * PROW + k0 + (lane >> 4) * 8);
                ldsm_x4(as, sS + (kr0 + (lane & 15)) * PROW + k0 + (lane >> 4) * 8);
                const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
                for (int np = 0; np < NTB / 2; ++np) {
                    const int col = dc0 + np * 16 + (lane >> 4) * 8;
                    uint32_t bo[4], bq[4];
                    ldsm_x4_t(bo, sO + row * SROW + col);
                    ldsm_x4_t(bq, sQ + row * SROW + col);
                    mma<T>(accV[2 * np], ap, bo[0], bo[1]);
                    mma<T>(accV[2 * np + 1], ap, bo[2], bo[3]);
                    mma<T>(accK[2 * np], as, bq[0], bq[1]);
                    mma<T>(accK[2 * np + 1], as, bq[2], bq[3]);
                }
                if constexpr (NTB % 2 == 1) {
                    const int col = dc0 + (NTB - 1) * 8;
                    uint32_t bo[2], bq[2];
                    ldsm_x2_t(bo, sO + row * SROW + col);
                    ldsm_x2_t(bq, sQ + row * SROW + col);
                    mma<T>(accV[NTB - 1], ap, bo[0], bo[1]);
                    mma<T>(accK[NTB - 1], as, bq[0], bq[1]);
                }
            }

            // dQ += dS K (queries x d), added to the fp32 buffer with atomics.
            if (p.dq_atomic) {
                const int qr = warp % C::QR, qc = warp / C::QR;
                const int m0 = qr * 16, e0 = qc * DQ;
                float aQ[NTQ][4];
#pragma unroll
                for (int n = 0; n < NTQ; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) aQ[n][e] = 0.f;
#pragma unroll 2
                for (int k0 = 0; k0 < BN; k0 += 16) {
                    uint32_t a[4];
                    // A = dS (query x key) read from dS^T [key][query] with a transposing load.
                    ldsm_x4_t(a, sS + (k0 + (lane & 7) + (lane >> 4) * 8) * PROW + m0 + ((lane >> 3) & 1) * 8);
                    const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
                    for (int np = 0; np < NTQ / 2; ++np) {
                        uint32_t bk[4];
                        ldsm_x4_t(bk, sK + row * SROW + e0 + np * 16 + (lane >> 4) * 8);
                        mma<T>(aQ[2 * np], a, bk[0], bk[1]);
                        mma<T>(aQ[2 * np + 1], a, bk[2], bk[3]);
                    }
                    if constexpr (NTQ % 2 == 1) {
                        uint32_t bk[2];
                        ldsm_x2_t(bk, sK + row * SROW + e0 + (NTQ - 1) * 8);
                        mma<T>(aQ[NTQ - 1], a, bk[0], bk[1]);
                    }
                }
#pragma unroll
                for (int n = 0; n < NTQ; ++n) {
#pragma unroll
                    for (int hh = 0; hh < 2; ++hh) {
                        const int r = r0 + m0 + g + hh * 8;
                        const int col = e0 + n * 8 + 2 * t4;
                        if (r < i && col < d) {
                            float* dst = p.dq + (qbase + r) * d + col;
                            atomicAdd(dst, p.scale * aQ[n][hh * 2]);
                            atomicAdd(dst + 1, p.scale * aQ[n][hh * 2 + 1]);
                        }
                    }
                }
            }
        }
    }

    // Write dV (input dtype) and dK_hat (fp32, scaled).
    const int dc0 = wc * DB;
#pragma unroll
    for (int n = 0; n < NTB; ++n) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int c = c0 + wr * 16 + g + hh * 8;
            const int col = dc0 + n * 8 + 2 * t4;
            if (c < j && col < d) {
                const int64_t off = ((int64_t)bi * p.hk + kh) * j * d + (int64_t)c * d + col;
                *reinterpret_cast<uint32_t*>(reinterpret_cast<T*>(p.dv) + off) =
                    pack2<T>(accV[n][hh * 2], accV[n][hh * 2 + 1]);
                *reinterpret_cast<float2*>(p.dk + off) =
                    make_float2(p.scale * accK[n][hh * 2], p.scale * accK[n][hh * 2 + 1]);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core dQ kernel (deterministic): warp w owns query rows 16*(w % (BM/16)) and d columns
// (w / (BM/16)) * DQ; with more than one column split the S/dP work is repeated per split.
template <int DP, typename T, int BM, int NW>
struct DqCfg {
    static constexpr int BN = 64;
    static constexpr int THREADS = NW * 32;
    static constexpr int SROW = DP + 8;
    static constexpr int SMEM = (2 * BN * SROW + 2 * BM * SROW) * sizeof(T);
};

template <int DP, typename T, int BM, int NW>
__device__ __forceinline__ void dq_tc(const Params& p) {
    using C = DqCfg<DP, T, BM, NW>;
    constexpr int BN = C::BN, SROW = C::SROW;
    constexpr int QR = BM / 16, QC = NW / QR;
    constexpr int DQ = DP / QC, NTQ = DQ / 8;
    constexpr int NTS = BN / 8;

    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sO = sQ + BM * SROW;
    T* sK = sO + BM * SROW;
    T* sV = sK + BN * SROW;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;
    const int qr = warp % QR, qc = warp / QR;
    const int r0 = blockIdx.x * BM;
    const int hq = blockIdx.y, bi = blockIdx.z;
    const int i = p.i, j = p.j, d = p.d;
    const int kh = hq / (p.h / p.hk);
    const int64_t qbase = ((int64_t)bi * p.h + hq) * i;
    const int64_t kvbase = ((int64_t)bi * p.hk + kh) * j;
    const unsigned char* mrow = p.mask ? p.mask + (int64_t)bi * j : nullptr;

    load_tile<BM, DP, SROW, C::THREADS>(sQ, reinterpret_cast<const T*>(p.q) + (qbase + r0) * d, i - r0, d);
    load_tile<BM, DP, SROW, C::THREADS>(sO, reinterpret_cast<const T*>(p.dout) + (qbase + r0) * d, i - r0, d);
    cp_commit();

    const int m0 = qr * 16, e0 = qc * DQ;
    float L[2], Dr[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = r0 + m0 + g + hh * 8;
        L[hh] = r < i ? lse2_of(p.lse[qbase + r]) : CBWD_INF;
        Dr[hh] = r < i ? p.dsum[qbase + r] : 0.f;
    }
    float aQ[NTQ][4];
#pragma unroll
    for (int n = 0; n < NTQ; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) aQ[n][e] = 0.f;

    // Keys visible to the last row of this tile (causal).
    int c_end = j;
    if (p.causal) c_end = max(0, min(j, min(i, r0 + BM) + (j - i)));

    for (int c0 = 0; c0 < c_end; c0 += BN) {
        __syncthreads();
        load_tile<BN, DP, SROW, C::THREADS>(sK, reinterpret_cast<const T*>(p.k) + (kvbase + c0) * d, j - c0, d);
        load_tile<BN, DP, SROW, C::THREADS>(sV, reinterpret_cast<const T*>(p.v) + (kvbase + c0) * d, j - c0, d);
        cp_commit();
        cp_wait_all();
        __syncthreads();

        float aS[NTS][4], aP[NTS][4];
#pragma unroll
        for (int n = 0; n < NTS; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) aS[n][e] = aP[n][e] = 0.f;
#pragma unroll 2
        for (int k0 = 0; k0 < DP; k0 += 16) {
            uint32_t aq[4], ao[4];
            ldsm_x4(aq, sQ + (m0 + (lane & 15)) * SROW + k0 + (lane >> 4) * 8);
            ldsm_x4(ao, sO + (m0 + (lane & 15)) * SROW + k0 + (lane >> 4) * 8);
#pragma unroll
            for (int np = 0; np < NTS / 2; ++np) {
                const int row = np * 16 + (lane & 7) + (lane >> 4) * 8;
                const int col = k0 + ((lane >> 3) & 1) * 8;
                uint32_t bk[4], bv[4];
                ldsm_x4(bk, sK + row * SROW + col);
                ldsm_x4(bv, sV + row * SROW + col);
                mma<T>(aS[2 * np], aq, bk[0], bk[1]);
                mma<T>(aS[2 * np + 1], aq, bk[2], bk[3]);
                mma<T>(aP[2 * np], ao, bv[0], bv[1]);
                mma<T>(aP[2 * np + 1], ao, bv[2], bv[3]);
            }
        }
        // dS in registers, repacked as A fragments (the C layout of two n8 tiles is the A layout
        // of one k16 step).
        uint32_t aF[NTS / 2][4];
#pragma unroll
        for (int n = 0; n < NTS; ++n) {
            float ds[4];
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int r = r0 + m0 + g + hh * 8;
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = c0 + n * 8 + 2 * t4 + e;
                    float v = 0.f;
                    if (visible(r, c, i, j, p.causal, mrow)) {
                        float s = p.scale * aS[n][hh * 2 + e];
                        if (p.bias) s += bias_at<T>(p, bi, hq, r, c);
                        const float pr = exp2f(s * LOG2E - L[hh]);
                        v = pr * (aP[n][hh * 2 + e] - Dr[hh]);
                    }
                    ds[hh * 2 + e] = v;
                }
            }
            aF[n / 2][(n & 1) * 2 + 0] = pack2<T>(ds[0], ds[1]);
            aF[n / 2][(n & 1) * 2 + 1] = pack2<T>(ds[2], ds[3]);
        }
        // dQ += dS K
#pragma unroll
        for (int ks = 0; ks < NTS / 2; ++ks) {
            const int row = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
            for (int np = 0; np < NTQ / 2; ++np) {
                uint32_t bk[4];
                ldsm_x4_t(bk, sK + row * SROW + e0 + np * 16 + (lane >> 4) * 8);
                mma<T>(aQ[2 * np], aF[ks], bk[0], bk[1]);
                mma<T>(aQ[2 * np + 1], aF[ks], bk[2], bk[3]);
            }
            if constexpr (NTQ % 2 == 1) {
                uint32_t bk[2];
                ldsm_x2_t(bk, sK + row * SROW + e0 + (NTQ - 1) * 8);
                mma<T>(aQ[NTQ - 1], aF[ks], bk[0], bk[1]);
            }
        }
    }
#pragma unroll
    for (int n = 0; n < NTQ; ++n) {
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = r0 + m0 + g + hh * 8;
            const int col = e0 + n * 8 + 2 * t4;
            if (r < i && col < d)
                *reinterpret_cast<float2*>(p.dq + (qbase + r) * d + col) =
                    make_float2(p.scale * aQ[n][hh * 2], p.scale * aQ[n][hh * 2 + 1]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// fp32 on CUDA cores. 256 threads, 32 x 32 tiles; thread t owns row t/8 of the block's own side
// and the columns t%8 + 8m of the other side / of d.
constexpr int F_B = 32;
constexpr int F_T = 256;

template <int D>
struct F32Cfg {
    static constexpr int SROW = D + 4;  // rows shift by 4 banks: 8 rows read in one step hit 8 banks groups
    static constexpr int SMEM = (4 * F_B * SROW + 2 * F_B * (F_B + 1) + 2 * F_B) * sizeof(float);
};

template <int D>
__device__ __forceinline__ void load_f32(float* s, const float* g, int n_valid) {
    constexpr int SROW = F32Cfg<D>::SROW;
    constexpr int CH = D / 4;
    for (int idx = threadIdx.x; idx < F_B * CH; idx += F_T) {
        int r = idx / CH, col = (idx % CH) * 4;
        cp_async16(s + r * SROW + col, r < n_valid ? g + (int64_t)r * D + col : g,
                   r < n_valid ? 16 : 0);
    }
}

template <int D>
__device__ __forceinline__ void kv_f32(const Params& p) {
    constexpr int SROW = F32Cfg<D>::SROW, PR = F_B + 1, M = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sK = reinterpret_cast<float*>(smem_raw);
    float* sV = sK + F_B * SROW;
    float* sQ = sV + F_B * SROW;
    float* sO = sQ + F_B * SROW;
    float* sP = sO + F_B * SROW;   // [key][query]
    float* sS = sP + F_B * PR;
    float* sL = sS + F_B * PR;
    float* sD = sL + F_B;

    const int tid = threadIdx.x, own = tid >> 3, sub = tid & 7;
    const int c0 = blockIdx.x * F_B, kh = blockIdx.y, bi = blockIdx.z;
    const int i = p.i, j = p.j;
    const int rep = p.h / p.hk;
    const int64_t kvoff = ((int64_t)bi * p.hk + kh) * j * D + (int64_t)c0 * D;
    load_f32<D>(sK, reinterpret_cast<const float*>(p.k) + kvoff, j - c0);
    load_f32<D>(sV, reinterpret_cast<const float*>(p.v) + kvoff, j - c0);
    cp_commit();
    const unsigned char* mrow = p.mask ? p.mask + (int64_t)bi * j : nullptr;

    float accV[M], accK[M];
#pragma unroll
    for (int m = 0; m < M; ++m) accV[m] = accK[m] = 0.f;
    const int r_first = p.causal ? max(0, c0 - (j - i)) : 0;

    for (int hq = kh * rep; hq < (kh + 1) * rep; ++hq) {
        const int64_t qbase = ((int64_t)bi * p.h + hq) * i;
        for (int r0 = (r_first / F_B) * F_B; r0 < i; r0 += F_B) {
            __syncthreads();
            load_f32<D>(sQ, reinterpret_cast<const float*>(p.q) + (qbase + r0) * D, i - r0);
            load_f32<D>(sO, reinterpret_cast<const float*>(p.dout) + (qbase + r0) * D, i - r0);
            cp_commit();
            if (tid < F_B) {
                int r = r0 + tid;
                sL[tid] = r < i ? lse2_of(p.lse[qbase + r]) : CBWD_INF;
                sD[tid] = r < i ? p.dsum[qbase + r] : 0.f;
            }
            cp_wait_all();
            __syncthreads();
            // key own, queries sub + 8m
            float s[4] = {0, 0, 0, 0}, dp[4] = {0, 0, 0, 0};
            for (int k = 0; k < D; ++k) {
                const float kk = sK[own * SROW + k], vv = sV[own * SROW + k];
#pragma unroll
                for (int m = 0; m < 4; ++m) {
                    s[m] = fmaf(kk, sQ[(sub + 8 * m) * SROW + k], s[m]);
                    dp[m] = fmaf(vv, sO[(sub + 8 * m) * SROW + k], dp[m]);
                }
            }
            const int c = c0 + own;
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                const int ql = sub + 8 * m, r = r0 + ql;
                float pr = 0.f, ds = 0.f;
                if (visible(r, c, i, j, p.causal, mrow)) {
                    float x = p.scale * s[m];
                    if (p.bias) x += bias_at<float>(p, bi, hq, r, c);
                    pr = exp2f(x * LOG2E - sL[ql]);
                    ds = pr * (dp[m] - sD[ql]);
                }
                if (p.dbias_mode != DB_NONE && r < i && c < j) put_dbias<float>(p, bi, hq, r, c, ds);
                sP[own * PR + ql] = pr;
                sS[own * PR + ql] = ds;
            }
            __syncthreads();
            for (int q = 0; q < F_B; ++q) {
                const float pr = sP[own * PR + q], ds = sS[own * PR + q];
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    accV[m] = fmaf(pr, sO[q * SROW + sub + 8 * m], accV[m]);
                    accK[m] = fmaf(ds, sQ[q * SROW + sub + 8 * m], accK[m]);
                }
            }
        }
    }
    const int c = c0 + own;
    if (c < j) {
        const int64_t off = ((int64_t)bi * p.hk + kh) * j * D + (int64_t)c * D;
#pragma unroll
        for (int m = 0; m < M; ++m) {
            reinterpret_cast<float*>(p.dv)[off + sub + 8 * m] = accV[m];
            p.dk[off + sub + 8 * m] = p.scale * accK[m];
        }
    }
}

template <int D>
__device__ __forceinline__ void dq_f32(const Params& p) {
    constexpr int SROW = F32Cfg<D>::SROW, PR = F_B + 1, M = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    float* sQ = reinterpret_cast<float*>(smem_raw);
    float* sO = sQ + F_B * SROW;
    float* sK = sO + F_B * SROW;
    float* sV = sK + F_B * SROW;
    float* sS = sV + F_B * SROW;  // [query][key]

    const int tid = threadIdx.x, own = tid >> 3, sub = tid & 7;
    const int r0 = blockIdx.x * F_B, hq = blockIdx.y, bi = blockIdx.z;
    const int i = p.i, j = p.j;
    const int kh = hq / (p.h / p.hk);
    const int64_t qbase = ((int64_t)bi * p.h + hq) * i;
    const int64_t kvbase = ((int64_t)bi * p.hk + kh) * j;
    const unsigned char* mrow = p.mask ? p.mask + (int64_t)bi * j : nullptr;
    load_f32<D>(sQ, reinterpret_cast<const float*>(p.q) + (qbase + r0) * D, i - r0);
    load_f32<D>(sO, reinterpret_cast<const float*>(p.dout) + (qbase + r0) * D, i - r0);
    cp_commit();
    const int r = r0 + own;
    const float L = r < i ? lse2_of(p.lse[qbase + r]) : CBWD_INF;
    const float Dr = r < i ? p.dsum[qbase + r] : 0.f;
    float acc[M];
#pragma unroll
    for (int m = 0; m < M; ++m) acc[m] = 0.f;
    int c_end = j;
    if (p.causal) c_end = max(0, min(j, min(i, r0 + F_B) + (j - i)));

    for (int c0 = 0; c0 < c_end; c0 += F_B) {
        __syncthreads();
        load_f32<D>(sK, reinterpret_cast<const float*>(p.k) + (kvbase + c0) * D, j - c0);
        load_f32<D>(sV, reinterpret_cast<const float*>(p.v) + (kvbase + c0) * D, j - c0);
        cp_commit();
        cp_wait_all();
        __syncthreads();
        float s[4] = {0, 0, 0, 0}, dp[4] = {0, 0, 0, 0};
        for (int k = 0; k < D; ++k) {
            const float qq = sQ[own * SROW + k], oo = sO[own * SROW + k];
#pragma unroll
            for (int m = 0; m < 4; ++m) {
                s[m] = fmaf(qq, sK[(sub + 8 * m) * SROW + k], s[m]);
                dp[m] = fmaf(oo, sV[(sub + 8 * m) * SROW + k], dp[m]);
            }
        }
#pragma unroll
        for (int m = 0; m < 4; ++m) {
            const int cl = sub + 8 * m, c = c0 + cl;
            float ds = 0.f;
            if (visible(r, c, i, j, p.causal, mrow)) {
                float x = p.scale * s[m];
                if (p.bias) x += bias_at<float>(p, bi, hq, r, c);
                const float pr = exp2f(x * LOG2E - L);
                ds = pr * (dp[m] - Dr);
            }
            sS[own * PR + cl] = ds;
        }
        __syncthreads();
        for (int cl = 0; cl < F_B; ++cl) {
            const float ds = sS[own * PR + cl];
#pragma unroll
            for (int m = 0; m < M; ++m) acc[m] = fmaf(ds, sK[cl * SROW + sub + 8 * m], acc[m]);
        }
    }
    if (r < i) {
#pragma unroll
        for (int m = 0; m < M; ++m) p.dq[(qbase + r) * D + sub + 8 * m] = p.scale * acc[m];
    }
}

}  // namespace cbwd

// Entry points (templates instantiated by name from the host). Arguments are flat scalars and
// pointers, the portable way to pass them through CuPy's RawKernel.
#define CBWD_ARGS                                                                                \
    const void *q, const void *k, const void *v, const void *dout, const float *lse,             \
        const float *dsum, const unsigned char *mask, const void *bias, long long bs_b,          \
        long long bs_h, long long bs_i, long long bs_j, void *dbias, long long ds_b,             \
        long long ds_h, long long ds_i, long long ds_j, float *dq, float *dk, void *dv, int b,   \
        int h, int hk, int i, int j, int d, float scale, int causal, int dbias_mode, int dq_atomic
#define CBWD_PARAMS                                                                              \
    cbwd::Params p{q, k, v, dout, lse, dsum, mask, bias, bs_b, bs_h, bs_i, bs_j, dbias, ds_b,    \
                   ds_h, ds_i, ds_j, dq, dk, dv, b, h, hk, i, j, d, scale, causal, dbias_mode,   \
                   dq_atomic}

template <typename T>
__global__ void attn_bwd_dot(const T* dout, const T* out, float* dsum, long long rows, int d) {
    cbwd::dot_rows<T>(dout, out, dsum, rows, d);
}

template <int DP, typename T, int BN, int BM, int WC>
__global__ void __launch_bounds__(cbwd::KvCfg<DP, T, BN, BM, WC>::THREADS)
attn_bwd_kv_tc(CBWD_ARGS) {
    CBWD_PARAMS;
    cbwd::kv_tc<DP, T, BN, BM, WC>(p);
}

template <int DP, typename T, int BM, int NW>
__global__ void __launch_bounds__(NW * 32) attn_bwd_dq_tc(CBWD_ARGS) {
    CBWD_PARAMS;
    cbwd::dq_tc<DP, T, BM, NW>(p);
}

template <int D>
__global__ void __launch_bounds__(cbwd::F_T) attn_bwd_kv_f32(CBWD_ARGS) {
    CBWD_PARAMS;
    cbwd::kv_f32<D>(p);
}

template <int D>
__global__ void __launch_bounds__(cbwd::F_T) attn_bwd_dq_f32(CBWD_ARGS) {
    CBWD_PARAMS;
    cbwd::dq_f32<D>(p);
}

// dx = r * (dxhat - xhat <xhat, dxhat>) per group (through the grouped l2 normalisation), or a
// plain fp32 -> T conversion when r is null (no normalisation; also used for dbias buffers).
// One warp per row of d elements.
template <typename T>
__global__ void attn_bwd_l2norm(const float* dxhat, const T* xhat, const float* rnorm, T* dx,
                                long long rows, int d, int groups) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float* dr = dxhat + row * d;
    T* o = dx + row * d;
    if (rnorm == nullptr) {
        for (int e = lane; e < d; e += 32) o[e] = cbwd::from_f<T>(dr[e]);
        return;
    }
    const T* xr = xhat + row * d;
    const int gs = d / groups;
    for (int g = 0; g < groups; ++g) {
        float dot = 0.f;
        for (int e = g * gs + lane; e < (g + 1) * gs; e += 32) dot += cbwd::to_f(xr[e]) * dr[e];
        for (int s = 16; s > 0; s >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, s);
        const float r = rnorm[row * groups + g];
        for (int e = g * gs + lane; e < (g + 1) * gs; e += 32)
            o[e] = cbwd::from_f<T>(r * (dr[e] - cbwd::to_f(xr[e]) * dot));
    }
}
