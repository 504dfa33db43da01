// Backward attention on qhat, khat (normalised by prep.cu), v, with P recomputed from lse:
//   P = exp2(s*scale*log2e + bias*log2e - lse*log2e),  dV = P^T dO,  dP = dO V^T,
//   dS = P (dP - D),  dbias = dS,  dkhat = scale dS^T qhat,  dqhat = scale dS khat.
// Rows with lse = -inf saw no key: P = 0 there, so every gradient from them is 0.
//
// attn_bwd_kv_mma   one CTA per (batch, k/v head, 64 keys; 4 warps x 16 keys) loops over the query
//                   tiles of every query head of its group: dK, dV stay in registers and are
//                   written once (no atomics, GQA sums in a fixed order). With ATOMIC_DQ it also
//                   adds dQ (and broadcast-bias gradients) with fp32 atomics: the fast default.
// attn_bwd_q_mma    deterministic dQ (and dbias): one CTA per (batch, head, 64 queries) loops over
//                   the key tiles in order; used when deterministic=True.
// attn_bwd_*_simt   fp32 versions of both (warp per row, plain FFMA), always deterministic.
#include "attn_common.cuh"
using namespace cattn;

template <int DP, typename T, bool ATOMIC_DQ>
__global__ void __launch_bounds__(128)
attn_bwd_kv_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                const T* __restrict__ bias, const unsigned char* __restrict__ mask,
                float* __restrict__ dq_acc, float* __restrict__ dk_out, T* __restrict__ dv_out,
                T* __restrict__ dbias, float* __restrict__ dbias_acc,
                long long bias_sb, long long bias_sh, long long bias_si,
                int B, int H, int HK, int I, int J, int D, int causal, float scale, float c_scale) {
    constexpr int BN = 64, BM = 64, SROW = DP + 8, SDS = BN + 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BN * SROW;
    T* sQ = sV + BN * SROW;               // 2 stages
    T* sO = sQ + 2 * BM * SROW;           // dO, 2 stages
    T* sdS = sO + 2 * BM * SROW;          // BM x SDS, dS (queries as rows) for dQ
    float* sL = reinterpret_cast<float*>(sdS + BM * SDS);   // 2 x BM lse*log2e
    float* sDl = sL + 2 * BM;                               // 2 x BM delta

    const int n_key_tiles = (J + BN - 1) / BN;
    const int n0 = (int)(blockIdx.x % n_key_tiles) * BN;
    const int bhk = blockIdx.x / n_key_tiles, bi = bhk / HK, hki = bhk % HK;
    const int group = H / HK;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const long long kv_off = ((long long)bhk * J + n0) * D;
    const unsigned char* mask_b = mask ? mask + (long long)bi * J : nullptr;
    const BiasView<T> bview{bias, bias_sb, bias_sh, bias_si};
    const BiasGrad<T> bgrad{dbias, ATOMIC_DQ ? dbias_acc : nullptr, bias_sb, bias_sh, bias_si};
    const bool want_dbias = ATOMIC_DQ && bias != nullptr;

    // Query rows that can see some key of this tile (causal: r >= n0 - (J - I)).
    const int m_first = causal ? max(0, n0 - (J - I)) : 0;
    const int t_first = m_first / BM, n_q_tiles = (I + BM - 1) / BM;
    const int per_head = max(0, n_q_tiles - t_first), total = per_head * group;

    load_tile_async<BN, DP, SROW, 128>(sK, k + kv_off, J - n0, D);
    load_tile_async<BN, DP, SROW, 128>(sV, v + kv_off, J - n0, D);

    auto load_q_tile = [&](int it, int stage) {
        const int hq = hki * group + it / per_head, m0 = (t_first + it % per_head) * BM;
        const long long qoff = ((long long)(bi * H + hq) * I + m0);
        load_tile_async<BM, DP, SROW, 128>(sQ + stage * BM * SROW, q + qoff * D, I - m0, D);
        load_tile_async<BM, DP, SROW, 128>(sO + stage * BM * SROW, dout + qoff * D, I - m0, D);
        for (int r = threadIdx.x; r < BM; r += 128) {
            const bool ok = m0 + r < I;
            sL[stage * BM + r] = ok ? lse_log2(lse[qoff + r]) : INFINITY;
            sDl[stage * BM + r] = ok ? delta[qoff + r] : 0.f;
        }
    };
    if (total > 0) load_q_tile(0, 0);
    cp_async_commit();

    float dk[DP / 8][4], dv[DP / 8][4];
#pragma unroll
    for (int i = 0; i < DP / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;

    const int key0 = n0 + warp * 16 + g, key1 = key0 + 8;
    for (int it = 0; it < total; ++it) {
        const int stage = it & 1;
        const int hq = hki * group + it / per_head, m0 = (t_first + it % per_head) * BM;
        if (it + 1 < total) load_q_tile(it + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* Qs = sQ + stage * BM * SROW;
        const T* Os = sO + stage * BM * SROW;
        const float* Ls = sL + stage * BM;
        const float* Ds = sDl + stage * BM;

        // S^T and dP^T for this warp's 16 keys x BM queries.
        float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
        for (int i = 0; i < BM / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) st[i][e] = dpt[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
            u32 kf[4], vf[4];
            ldmatrix_x4(kf, sK + (warp * 16 + lane % 16) * SROW + kk * 16 + (lane / 16) * 8);
            ldmatrix_x4(vf, sV + (warp * 16 + lane % 16) * SROW + kk * 16 + (lane / 16) * 8);
#pragma unroll
            for (int nb = 0; nb < BM / 16; ++nb) {
                u32 qf[4], of[4];
                const int off = (nb * 16 + lane % 8 + (lane / 16) * 8) * SROW + kk * 16 + ((lane / 8) % 2) * 8;
                ldmatrix_x4(qf, Qs + off);
                ldmatrix_x4(of, Os + off);
                mma_16816<T>(st[2 * nb], kf, qf[0], qf[1]);
                mma_16816<T>(st[2 * nb + 1], kf, qf[2], qf[3]);
                mma_16816<T>(dpt[2 * nb], vf, of[0], of[1]);
                mma_16816<T>(dpt[2 * nb + 1], vf, of[2], of[3]);
            }
        }
        // P^T and dS^T in place: st <- P, dpt <- dS.
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = e < 2 ? key0 : key1;
                const int qc = nb * 8 + 2 * t + (e & 1), row = m0 + qc;
                float x = fmaf(st[nb][e], c_scale, bias ? bview.log2_at(bi, hq, min(row, I - 1), min(key, J - 1)) : 0.f);
                float p = key_visible(mask_b, row, key, I, J, causal) ? fast_exp2(x - Ls[qc]) : 0.f;
                st[nb][e] = p;
                const float ds = p * (dpt[nb][e] - Ds[qc]);
                dpt[nb][e] = ds;
                if (want_dbias && p != 0.f) bgrad.put(bi, hq, row, key, ds);
            }
        }
        // dV += P^T dO ; dK += dS^T Q  (A operands straight from the accumulators)
#pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc) {
            u32 ap[4], as[4];
            ap[0] = Pack<T>::from_floats(st[2 * kc][0], st[2 * kc][1]);
            ap[1] = Pack<T>::from_floats(st[2 * kc][2], st[2 * kc][3]);
            ap[2] = Pack<T>::from_floats(st[2 * kc + 1][0], st[2 * kc + 1][1]);
            ap[3] = Pack<T>::from_floats(st[2 * kc + 1][2], st[2 * kc + 1][3]);
            as[0] = Pack<T>::from_floats(dpt[2 * kc][0], dpt[2 * kc][1]);
            as[1] = Pack<T>::from_floats(dpt[2 * kc][2], dpt[2 * kc][3]);
            as[2] = Pack<T>::from_floats(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]);
            as[3] = Pack<T>::from_floats(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3]);
#pragma unroll
            for (int db = 0; db < DP / 16; ++db) {
                u32 of[4], qf[4];
                const int off = (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW + db * 16 + (lane / 16) * 8;
                ldmatrix_x4_trans(of, Os + off);
                ldmatrix_x4_trans(qf, Qs + off);
                mma_16816<T>(dv[2 * db], ap, of[0], of[1]);
                mma_16816<T>(dv[2 * db + 1], ap, of[2], of[3]);
                mma_16816<T>(dk[2 * db], as, qf[0], qf[1]);
                mma_16816<T>(dk[2 * db + 1], as, qf[2], qf[3]);
            }
        }
        if (ATOMIC_DQ) {
            // dS (queries x keys) through shared memory, then warp w adds dQ rows [16w, 16w+16).
#pragma unroll
            for (int nb = 0; nb < BM / 8; ++nb) {
                const int qc = nb * 8 + 2 * t;
                const int kl = warp * 16 + g;
                sdS[qc * SDS + kl] = from_float<T>(dpt[nb][0]);
                sdS[(qc + 1) * SDS + kl] = from_float<T>(dpt[nb][1]);
                sdS[qc * SDS + kl + 8] = from_float<T>(dpt[nb][2]);
                sdS[(qc + 1) * SDS + kl + 8] = from_float<T>(dpt[nb][3]);
            }
            __syncthreads();
            float dq[DP / 8][4];
#pragma unroll
            for (int i = 0; i < DP / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < BN / 16; ++kk) {
                u32 af[4];
                ldmatrix_x4(af, sdS + (warp * 16 + lane % 16) * SDS + kk * 16 + (lane / 16) * 8);
#pragma unroll
                for (int db = 0; db < DP / 16; ++db) {
                    u32 kf[4];
                    ldmatrix_x4_trans(kf, sK + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW + db * 16 + (lane / 16) * 8);
                    mma_16816<T>(dq[2 * db], af, kf[0], kf[1]);
                    mma_16816<T>(dq[2 * db + 1], af, kf[2], kf[3]);
                }
            }
            const int r0 = m0 + warp * 16 + g, r1 = r0 + 8;
            float* dqb = dq_acc + (long long)(bi * H + hq) * I * D;
#pragma unroll
            for (int db = 0; db < DP / 8; ++db) {
                const int col = db * 8 + 2 * t;
                if (col < D) {
                    if (r0 < I) {
                        atomicAdd(dqb + (long long)r0 * D + col, dq[db][0] * scale);
                        atomicAdd(dqb + (long long)r0 * D + col + 1, dq[db][1] * scale);
                    }
                    if (r1 < I) {
                        atomicAdd(dqb + (long long)r1 * D + col, dq[db][2] * scale);
                        atomicAdd(dqb + (long long)r1 * D + col + 1, dq[db][3] * scale);
                    }
                }
            }
        }
        __syncthreads();   // stage and sdS are free for the next tile
    }

    // dkhat = scale * dK (fp32, normalisation backward follows); dv in T.
    float* dkb = dk_out + kv_off;
    T* dvb = dv_out + kv_off;
#pragma unroll
    for (int db = 0; db < DP / 8; ++db) {
        const int col = db * 8 + 2 * t;
        if (col < D) {
            const int k0 = warp * 16 + g, k1 = k0 + 8;
            if (n0 + k0 < J) {
                dkb[(long long)k0 * D + col] = dk[db][0] * scale;
                dkb[(long long)k0 * D + col + 1] = dk[db][1] * scale;
                *reinterpret_cast<u32*>(dvb + (long long)k0 * D + col) = Pack<T>::from_floats(dv[db][0], dv[db][1]);
            }
            if (n0 + k1 < J) {
                dkb[(long long)k1 * D + col] = dk[db][2] * scale;
                dkb[(long long)k1 * D + col + 1] = dk[db][3] * scale;
                *reinterpret_cast<u32*>(dvb + (long long)k1 * D + col) = Pack<T>::from_floats(dv[db][2], dv[db][3]);
            }
        }
    }
}

// Deterministic dQ: per (batch, head, 64 queries), key tiles in a fixed order. Also writes dS to
// the bias gradient (direct: every element once per (b, h)) when dbias_full is given.
template <int DP, typename T>
__global__ void __launch_bounds__(128)
attn_bwd_q_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
               const T* __restrict__ bias, const unsigned char* __restrict__ mask,
               float* __restrict__ dq_out, float* __restrict__ dbias_full,
               long long bias_sb, long long bias_sh, long long bias_si,
               int B, int H, int HK, int I, int J, int D, int causal, float scale, float c_scale) {
    constexpr int BM = 64, BN = 64, SROW = DP + 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sO = sQ + BM * SROW;
    T* sK = sO + BM * SROW;      // 2 stages
    T* sV = sK + 2 * BN * SROW;  // 2 stages

    const int n_row_tiles = (I + BM - 1) / BM;
    const int m0 = (n_row_tiles - 1 - (int)(blockIdx.x % n_row_tiles)) * BM;
    const int bh = blockIdx.x / n_row_tiles, bi = bh / H, hi = bh % H, hki = hi / (H / HK);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const long long qoff = ((long long)bh * I + m0);
    const long long kv_off = (long long)(bi * HK + hki) * J * D;
    const unsigned char* mask_b = mask ? mask + (long long)bi * J : nullptr;
    const BiasView<T> bview{bias, bias_sb, bias_sh, bias_si};
    const int n_end = key_end(m0, BM, I, J, causal);
    const int n_tiles = (n_end + BN - 1) / BN;

    load_tile_async<BM, DP, SROW, 128>(sQ, q + qoff * D, I - m0, D);
    load_tile_async<BM, DP, SROW, 128>(sO, dout + qoff * D, I - m0, D);
    if (n_tiles > 0) {
        load_tile_async<BN, DP, SROW, 128>(sK, k + kv_off, J, D);
        load_tile_async<BN, DP, SROW, 128>(sV, v + kv_off, J, D);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[DP / 16][4], of[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
        ldmatrix_x4(qf[kk], sQ + (warp * 16 + lane % 16) * SROW + kk * 16 + (lane / 16) * 8);
        ldmatrix_x4(of[kk], sO + (warp * 16 + lane % 16) * SROW + kk * 16 + (lane / 16) * 8);
    }
    const int row0 = m0 + warp * 16 + g, row1 = row0 + 8;
    const float l0 = row0 < I ? lse_log2(lse[qoff + warp * 16 + g]) : INFINITY;
    const float l1 = row1 < I ? lse_log2(lse[qoff + warp * 16 + g + 8]) : INFINITY;
    const float d0 = row0 < I ? delta[qoff + warp * 16 + g] : 0.f;
    const float d1 = row1 < I ? delta[qoff + warp * 16 + g + 8] : 0.f;
    float dq[DP / 8][4];
#pragma unroll
    for (int i = 0; i < DP / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int n0 = tile * BN, cur = tile & 1;
        if (tile + 1 < n_tiles) {
            const int nn = n0 + BN;
            load_tile_async<BN, DP, SROW, 128>(sK + (cur ^ 1) * BN * SROW, k + kv_off + (long long)nn * D, J - nn, D);
            load_tile_async<BN, DP, SROW, 128>(sV + (cur ^ 1) * BN * SROW, v + kv_off + (long long)nn * D, J - nn, D);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* kS = sK + cur * BN * SROW;
        const T* vS = sV + cur * BN * SROW;
        float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
            for (int nb = 0; nb < BN / 16; ++nb) {
                u32 kf[4], vf[4];
                const int off = (nb * 16 + lane % 8 + (lane / 16) * 8) * SROW + kk * 16 + ((lane / 8) % 2) * 8;
                ldmatrix_x4(kf, kS + off);
                ldmatrix_x4(vf, vS + off);
                mma_16816<T>(s[2 * nb], qf[kk], kf[0], kf[1]);
                mma_16816<T>(s[2 * nb + 1], qf[kk], kf[2], kf[3]);
                mma_16816<T>(dp[2 * nb], of[kk], vf[0], vf[1]);
                mma_16816<T>(dp[2 * nb + 1], of[kk], vf[2], vf[3]);
            }
        }
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? row0 : row1;
                const int col = n0 + nb * 8 + 2 * t + (e & 1);
                float x = fmaf(s[nb][e], c_scale, bias ? bview.log2_at(bi, hi, min(row, I - 1), min(col, J - 1)) : 0.f);
                const float p = key_visible(mask_b, row, col, I, J, causal) ? fast_exp2(x - (e < 2 ? l0 : l1)) : 0.f;
                const float ds = p * (dp[nb][e] - (e < 2 ? d0 : d1));
                s[nb][e] = ds;
                if (dbias_full && row < I && col < J)
                    dbias_full[((long long)bh * I + row) * J + col] = ds;
            }
        }
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
            u32 a[4];
            a[0] = Pack<T>::from_floats(s[2 * kc][0], s[2 * kc][1]);
            a[1] = Pack<T>::from_floats(s[2 * kc][2], s[2 * kc][3]);
            a[2] = Pack<T>::from_floats(s[2 * kc + 1][0], s[2 * kc + 1][1]);
            a[3] = Pack<T>::from_floats(s[2 * kc + 1][2], s[2 * kc + 1][3]);
#pragma unroll
            for (int db = 0; db < DP / 16; ++db) {
                u32 kf[4];
                ldmatrix_x4_trans(kf, kS + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW + db * 16 + (lane / 16) * 8);
                mma_16816<T>(dq[2 * db], a, kf[0], kf[1]);
                mma_16816<T>(dq[2 * db + 1], a, kf[2], kf[3]);
            }
        }
        __syncthreads();
    }
    float* dqb = dq_out + (long long)bh * I * D;
#pragma unroll
    for (int db = 0; db < DP / 8; ++db) {
        const int col = db * 8 + 2 * t;
        if (col < D) {
            if (row0 < I) {
                dqb[(long long)row0 * D + col] = dq[db][0] * scale;
                dqb[(long long)row0 * D + col + 1] = dq[db][1] * scale;
            }
            if (row1 < I) {
                dqb[(long long)row1 * D + col] = dq[db][2] * scale;
                dqb[(long long)row1 * D + col + 1] = dq[db][3] * scale;
            }
        }
    }
}

// ---- fp32: warp per row, lanes over 32 keys (or queries) at a time, deterministic ----

template <int DP>
__global__ void __launch_bounds__(128)
attn_bwd_q_simt(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                const float* __restrict__ bias, const unsigned char* __restrict__ mask,
                float* __restrict__ dq_out, float* __restrict__ dbias_full,
                long long bias_sb, long long bias_sh, long long bias_si,
                int B, int H, int HK, int I, int J, int D, int causal, float scale, float c_scale) {
    constexpr int PER_LANE = DP / 32;
    __shared__ float sq[4][DP], so[4][DP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_row_tiles = (I + 3) / 4;
    const int row = (int)(blockIdx.x % n_row_tiles) * 4 + warp;
    const int bh = blockIdx.x / n_row_tiles, bi = bh / H, hi = bh % H, hki = hi / (H / HK);
    if (row >= I) return;
    const long long roff = (long long)bh * I + row;
    for (int e = lane; e < DP; e += 32) {
        sq[warp][e] = e < D ? q[roff * D + e] : 0.f;
        so[warp][e] = e < D ? dout[roff * D + e] : 0.f;
    }
    __syncwarp();
    const long long kv_off = (long long)(bi * HK + hki) * J * D;
    const unsigned char* mask_b = mask ? mask + (long long)bi * J : nullptr;
    const BiasView<float> bview{bias, bias_sb, bias_sh, bias_si};
    const float l2 = lse_log2(lse[roff]), dl = delta[roff];
    const int n_end = key_end(row, 1, I, J, causal);
    float dq[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) dq[r] = 0.f;
    for (int n0 = 0; n0 < n_end; n0 += 32) {
        const int col = n0 + lane;
        float ds = 0.f;
        if (key_visible(mask_b, row, col, I, J, causal)) {
            const float* kr = k + kv_off + (long long)col * D;
            const float* vr = v + kv_off + (long long)col * D;
            float s = 0.f, dp = 0.f;
            for (int e = 0; e < D; ++e) {
                s = fmaf(sq[warp][e], kr[e], s);
                dp = fmaf(so[warp][e], vr[e], dp);
            }
            const float p = exp2f(fmaf(s, c_scale, bview.log2_at(bi, hi, row, col)) - l2);
            ds = p * (dp - dl);
        }
        if (dbias_full && col < J) dbias_full[roff * J + col] = ds;
        const int chunk = min(32, n_end - n0);
        for (int kk = 0; kk < chunk; ++kk) {
            const float dsk = __shfl_sync(0xffffffffu, ds, kk);
            if (dsk != 0.f) {
                const float* kr = k + kv_off + (long long)(n0 + kk) * D;
#pragma unroll
                for (int r = 0; r < PER_LANE; ++r) {
                    const int e = lane + 32 * r;
                    if (e < D) dq[r] = fmaf(dsk, kr[e], dq[r]);
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) {
        const int e = lane + 32 * r;
        if (e < D) dq_out[roff * D + e] = dq[r] * scale;
    }
}

template <int DP>
__global__ void __launch_bounds__(128)
attn_bwd_kv_simt(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                 const float* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                 const float* __restrict__ bias, const unsigned char* __restrict__ mask,
                 float* __restrict__ dk_out, float* __restrict__ dv_out,
                 long long bias_sb, long long bias_sh, long long bias_si,
                 int B, int H, int HK, int I, int J, int D, int causal, float scale, float c_scale) {
    constexpr int PER_LANE = DP / 32;
    __shared__ float sk[4][DP], sv[4][DP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_key_tiles = (J + 3) / 4;
    const int key = (int)(blockIdx.x % n_key_tiles) * 4 + warp;
    const int bhk = blockIdx.x / n_key_tiles, bi = bhk / HK, hki = bhk % HK, group = H / HK;
    if (key >= J) return;
    const long long koff = (long long)bhk * J + key;
    for (int e = lane; e < DP; e += 32) {
        sk[warp][e] = e < D ? k[koff * D + e] : 0.f;
        sv[warp][e] = e < D ? v[koff * D + e] : 0.f;
    }
    __syncwarp();
    const unsigned char* mask_b = mask ? mask + (long long)bi * J : nullptr;
    const bool kept = mask_b == nullptr || mask_b[key] != 0;
    const BiasView<float> bview{bias, bias_sb, bias_sh, bias_si};
    const int r_first = causal ? max(0, key - (J - I)) : 0;
    float dk[PER_LANE], dv[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) dk[r] = dv[r] = 0.f;
    for (int hq = hki * group; kept && hq < (hki + 1) * group; ++hq) {
        const long long qbase = (long long)(bi * H + hq) * I;
        for (int r0 = r_first; r0 < I; r0 += 32) {
            const int row = r0 + lane;
            float p = 0.f, ds = 0.f;
            if (row < I) {
                const float* qr = q + (qbase + row) * D;
                const float* orow = dout + (qbase + row) * D;
                float s = 0.f, dp = 0.f;
                for (int e = 0; e < D; ++e) {
                    s = fmaf(qr[e], sk[warp][e], s);
                    dp = fmaf(orow[e], sv[warp][e], dp);
                }
                p = exp2f(fmaf(s, c_scale, bview.log2_at(bi, hq, row, key)) - lse_log2(lse[qbase + row]));
                ds = p * (dp - delta[qbase + row]);
            }
            const int chunk = min(32, I - r0);
            for (int kk = 0; kk < chunk; ++kk) {
                const float pk = __shfl_sync(0xffffffffu, p, kk);
                const float dsk = __shfl_sync(0xffffffffu, ds, kk);
                if (pk != 0.f) {
                    const float* qr = q + (qbase + r0 + kk) * D;
                    const float* orow = dout + (qbase + r0 + kk) * D;
#pragma unroll
                    for (int r = 0; r < PER_LANE; ++r) {
                        const int e = lane + 32 * r;
                        if (e < D) {
                            dv[r] = fmaf(pk, orow[e], dv[r]);
                            dk[r] = fmaf(dsk, qr[e], dk[r]);
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) {
        const int e = lane + 32 * r;
        if (e < D) {
            dk_out[koff * D + e] = dk[r] * scale;
            dv_out[koff * D + e] = dv[r];
        }
    }
}
