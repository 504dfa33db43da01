// Forward attention on qhat, khat (already l2-normalised by prep.cu), v.
//
// p = exp2(s * scale*log2e + bias*log2e - shift*log2e): the shift is known before the first tile
// (cosine logits are bounded), so there is no running maximum and no rescaling of the
// accumulator. ONLINE=true is the exact running-maximum variant for logit ranges too wide for a
// fixed shift (problem.softmax_shift returned None).
//
// attn_fwd_mma: f16/bf16, one CTA = 16*WARPS query rows (16 per warp), key tiles of 64 double-buffered
// with cp.async; QK^T and PV on mma.sync m16n8k16 with fp32 accumulators; P stays in registers.
// attn_fwd_simt: fp32, one warp per query row, plain FFMA (accurate to ~1e-6, no TF32).
#include "attn_common.cuh"
using namespace cattn;

template <int DP, typename T, bool ONLINE, int WARPS>
__global__ void __launch_bounds__(32 * WARPS)
attn_fwd_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
             const T* __restrict__ bias, const unsigned char* __restrict__ mask,
             T* __restrict__ out, float* __restrict__ lse,
             long long bias_sb, long long bias_sh, long long bias_si,
             int B, int H, int HK, int I, int J, int D, int causal,
             float c_scale, float c_shift) {
    // 16 query rows per warp; +8 elements per smem row: conflict-free ldmatrix
    constexpr int BM = 16 * WARPS, BN = 64, SROW = DP + 8, THREADS = 32 * WARPS;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BM * SROW;
    T* sV = sK + 2 * BN * SROW;

    // Flat grid (no 65535 limit on batch*heads); heaviest causal row tiles are scheduled first.
    const int n_row_tiles = (I + BM - 1) / BM;
    const int m0 = (n_row_tiles - 1 - (int)(blockIdx.x % n_row_tiles)) * BM;
    const int bh = blockIdx.x / n_row_tiles, bi = bh / H, hi = bh % H, hki = hi / (H / HK);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const T* qb = q + ((long long)bh * I + m0) * D;
    const long long kv_off = (long long)(bi * HK + hki) * J * D;
    const T* kb = k + kv_off;
    const T* vb = v + kv_off;
    const unsigned char* mask_b = mask ? mask + (long long)bi * J : nullptr;
    const BiasView<T> bview{bias, bias_sb, bias_sh, bias_si};

    const int n_end = key_end(m0, BM, I, J, causal);
    const int n_tiles = (n_end + BN - 1) / BN;

    load_tile_async<BM, DP, SROW, THREADS>(sQ, qb, I - m0, D);
    if (n_tiles > 0) {
        load_tile_async<BN, DP, SROW, THREADS>(sK, kb, J, D);
        load_tile_async<BN, DP, SROW, THREADS>(sV, vb, J, D);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    u32 qf[DP / 16][4];
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk)
        ldmatrix_x4(qf[kk], sQ + (warp * 16 + lane % 16) * SROW + kk * 16 + (lane / 16) * 8);

    const int row0 = m0 + warp * 16 + g, row1 = row0 + 8;
    float o[DP / 8][4];
#pragma unroll
    for (int i = 0; i < DP / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float l0 = 0.f, l1 = 0.f;
    float mx0 = -INFINITY, mx1 = -INFINITY;  // ONLINE only, log2 units

    for (int tile = 0; tile < n_tiles; ++tile) {
        const int n0 = tile * BN, cur = tile & 1;
        if (tile + 1 < n_tiles) {
            const int nn = n0 + BN;
            load_tile_async<BN, DP, SROW, THREADS>(sK + (cur ^ 1) * BN * SROW, kb + (long long)nn * D, J - nn, D);
            load_tile_async<BN, DP, SROW, THREADS>(sV + (cur ^ 1) * BN * SROW, vb + (long long)nn * D, J - nn, D);
        }
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T* kS = sK + cur * BN * SROW;
        const T* vS = sV + cur * BN * SROW;

        float s[BN / 8][4];
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) {
#pragma unroll
            for (int nb = 0; nb < BN / 16; ++nb) {
                u32 kf[4];
                ldmatrix_x4(kf, kS + (nb * 16 + lane % 8 + (lane / 16) * 8) * SROW + kk * 16 + ((lane / 8) % 2) * 8);
                mma_16816<T>(s[2 * nb], qf[kk], kf[0], kf[1]);
                mma_16816<T>(s[2 * nb + 1], qf[kk], kf[2], kf[3]);
            }
        }

        // Only tiles on the causal diagonal, the key tail, or under a mask need per-key checks.
        const bool check = (causal && n0 + BN - 1 > m0 + (J - I)) || (n0 + BN > J) || mask_b != nullptr;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = e < 2 ? row0 : row1;
                const int col = n0 + nb * 8 + 2 * t + (e & 1);
                float x = fmaf(s[nb][e], c_scale, bias ? bview.log2_at(bi, hi, min(row, I - 1), min(col, J - 1)) : 0.f);
                if (check && !key_visible(mask_b, row, col, I, J, causal)) x = -INFINITY;
                s[nb][e] = x;
            }
        }
        float sh0 = c_shift, sh1 = c_shift;
        if (ONLINE) {
            float t0 = -INFINITY, t1 = -INFINITY;
#pragma unroll
            for (int nb = 0; nb < BN / 8; ++nb) {
                t0 = fmaxf(t0, fmaxf(s[nb][0], s[nb][1]));
                t1 = fmaxf(t1, fmaxf(s[nb][2], s[nb][3]));
            }
            const float n0m = fmaxf(mx0, quad_max(t0)), n1m = fmaxf(mx1, quad_max(t1));
            sh0 = n0m == -INFINITY ? 0.f : n0m;
            sh1 = n1m == -INFINITY ? 0.f : n1m;
            const float a0 = fast_exp2(mx0 - sh0), a1 = fast_exp2(mx1 - sh1);
            mx0 = n0m;
            mx1 = n1m;
            l0 *= a0;
            l1 *= a1;
#pragma unroll
            for (int i = 0; i < DP / 8; ++i) {
                o[i][0] *= a0; o[i][1] *= a0; o[i][2] *= a1; o[i][3] *= a1;
            }
        }
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
            s[nb][0] = fast_exp2(s[nb][0] - sh0);
            s[nb][1] = fast_exp2(s[nb][1] - sh0);
            s[nb][2] = fast_exp2(s[nb][2] - sh1);
            s[nb][3] = fast_exp2(s[nb][3] - sh1);
            l0 += s[nb][0] + s[nb][1];
            l1 += s[nb][2] + s[nb][3];
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
                u32 vf[4];
                ldmatrix_x4_trans(vf, vS + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * SROW + db * 16 + (lane / 16) * 8);
                mma_16816<T>(o[2 * db], a, vf[0], vf[1]);
                mma_16816<T>(o[2 * db + 1], a, vf[2], vf[3]);
            }
        }
        __syncthreads();  // every warp is done with buffer `cur` before it is refilled
    }

    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* ob = out + (long long)bh * I * D;
#pragma unroll
    for (int db = 0; db < DP / 8; ++db) {
        store_out_pair(ob, row0, I, D, db * 8 + 2 * t, o[db][0] * inv0, o[db][1] * inv0);
        store_out_pair(ob, row1, I, D, db * 8 + 2 * t, o[db][2] * inv1, o[db][3] * inv1);
    }
    if (t == 0) {
        store_lse(lse + (long long)bh * I, row0, I, l0, ONLINE ? mx0 : c_shift);
        store_lse(lse + (long long)bh * I, row1, I, l1, ONLINE ? mx1 : c_shift);
    }
}

// fp32: one warp per query row; each lane scores one key of a 32-key chunk, then the chunk's
// probabilities are broadcast to accumulate p * v over the lane's output columns.
template <int DP, bool ONLINE>
__global__ void __launch_bounds__(128)
attn_fwd_simt(const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
              const float* __restrict__ bias, const unsigned char* __restrict__ mask,
              float* __restrict__ out, float* __restrict__ lse,
              long long bias_sb, long long bias_sh, long long bias_si,
              int B, int H, int HK, int I, int J, int D, int causal,
              float c_scale, float c_shift) {
    constexpr int PER_LANE = DP / 32;
    __shared__ float sq[4][DP];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_row_tiles = (I + 3) / 4;
    const int row = (int)(blockIdx.x % n_row_tiles) * 4 + warp;
    const int bh = blockIdx.x / n_row_tiles, bi = bh / H, hi = bh % H, hki = hi / (H / HK);
    if (row >= I) return;
    const float* qr = q + ((long long)bh * I + row) * D;
    for (int e = lane; e < DP; e += 32) sq[warp][e] = e < D ? qr[e] : 0.f;
    __syncwarp();
    const long long kv_off = (long long)(bi * HK + hki) * J * D;
    const float* kb = k + kv_off;
    const float* vb = v + kv_off;
    const unsigned char* mask_b = mask ? mask + (long long)bi * J : nullptr;
    const BiasView<float> bview{bias, bias_sb, bias_sh, bias_si};
    const int n_end = key_end(row, 1, I, J, causal);

    float o[PER_LANE];
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) o[r] = 0.f;
    float l = 0.f, mx = -INFINITY;
    for (int n0 = 0; n0 < n_end; n0 += 32) {
        const int col = n0 + lane;
        float x = -INFINITY;
        if (key_visible(mask_b, row, col, I, J, causal)) {
            const float* kr = kb + (long long)col * D;
            float dot = 0.f;
            for (int e = 0; e < D; ++e) dot = fmaf(sq[warp][e], kr[e], dot);
            x = fmaf(dot, c_scale, bview.log2_at(bi, hi, row, col));
        }
        float shift = c_shift;
        if (ONLINE) {
            float m = x;
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
            const float nm = fmaxf(mx, m);
            shift = nm == -INFINITY ? 0.f : nm;
            const float a = exp2f(mx - shift);
            mx = nm;
            l *= a;
#pragma unroll
            for (int r = 0; r < PER_LANE; ++r) o[r] *= a;
        }
        const float p = x == -INFINITY ? 0.f : exp2f(x - shift);
        l += p;
        const int chunk = min(32, n_end - n0);
        for (int kk = 0; kk < chunk; ++kk) {
            const float pk = __shfl_sync(0xffffffffu, p, kk);
            if (pk != 0.f) {
                const float* vr = vb + (long long)(n0 + kk) * D;
#pragma unroll
                for (int r = 0; r < PER_LANE; ++r) {
                    const int e = lane + 32 * r;
                    if (e < D) o[r] = fmaf(pk, vr[e], o[r]);
                }
            }
        }
    }
    l = warp_sum(l);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* orow = out + ((long long)bh * I + row) * D;
#pragma unroll
    for (int r = 0; r < PER_LANE; ++r) {
        const int e = lane + 32 * r;
        if (e < D) orow[e] = o[r] * inv;
    }
    if (lane == 0) lse[(long long)bh * I + row] = l > 0.f ? ((ONLINE ? mx : c_shift) + log2f(l)) * LN2 : -INFINITY;
}
