// Hopper forward (sm_90a): the same contract and arguments as attn_fwd_mma in cosine_fwd.cu, on
// wgmma. Fixed shift only (the online variant stays on the sm_80 kernel).
//
// One CTA = WGS consumer warpgroups of 64 query rows each (WGS = 1: two CTAs share an SM and
// drift apart, so one's exponentials overlap the other's matrix products); key tiles of BN rows. K and V
// tiles sit in 128B-swizzled shared memory (sm90.cuh), in 2-stage rings, one barrier per key tile;
// the Q tile stays in smem. TMA: one thread fills the rings with bulk tensor copies completed on
// mbarriers (tensor maps tmap_k, tmap_v over (B*HK, J, D)), so the other threads spend no issue
// slots on load addresses; else every thread copies with cp.async. RELEASE (TMA only): instead of
// a CTA barrier per key tile, each warp releases a ring stage on an mbarrier when its wgmmas
// are done with it, and the issuing thread waits for that before refilling it, so warpgroups may
// drift up to a tile apart (one's exponentials under the other's products). WS (with RELEASE,
// two or three consumer warpgroups): warp specialisation, a producer warpgroup in front of the
// consumers whose thread 0 issues every K/V copy into a 3-stage ring as stages are released, the
// producer giving its registers to the consumers (setmaxnreg 24 / 240, or 24 / 160 for three:
// at d = 64 three consumers share each K/V tile, a third of the L2 traffic per product of one
// 64-row warpgroup per CTA, with as many warpgroups per SM). WS = 2 adds ping-pong: the two
// consumers take turns to issue their matrix products (named barriers 2 and 3), so one's
// exponentials run while the tensor cores work through the other's products. Per consumer
// warpgroup and key tile t:
//   issue S(t+1) = Q K(t+1)^T            (async, Q and K K-major in smem)
//   issue O += P(t) V(t)                   (async, P from registers, V MN-major in smem)
//   wait for S(t+1); exp2(S(t+1) * c - shift) while P(t) V(t) runs
//   wait for P(t) V(t); P(t+1) = the exponentials as 16-bit A fragments
// The known maximum means no row max and no accumulator rescale; l is summed once at the end.
// BIAS_MASK = false: a copy for calls with no bias and no key mask (the pointers are ignored).
#include "attn_common.cuh"
#include "sm90.cuh"
using namespace cattn;

#ifndef CATTN_DIAG
#define CATTN_DIAG 0   // phase probe (benchmarks/phase_probe.py): bits leave stages out; results wrong
#endif

template <int D, typename T, int BN, int WGS, bool QREG, bool TMA, bool RELEASE, int WS, bool BIAS_MASK>
__global__ void __launch_bounds__(WS ? 128 * WGS + 128 : 128 * WGS, WGS == 1 ? 2 : 1)
attn_fwd_wgmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ bias, const unsigned char* __restrict__ mask,
               T* __restrict__ out, float* __restrict__ lse,
               long long bias_sb, long long bias_sh, long long bias_si,
               int B, int H, int HK, int I, int J, int Dim, int causal,
               float c_scale, float c_shift,
               const __grid_constant__ TmaMap tmap_k, const __grid_constant__ TmaMap tmap_v,
               int stagger) {
    // THREADS: the consumer threads (the warpgroups that compute); WS puts a producer in front.
    constexpr int BM = 64 * WGS, STAGES = WS ? 3 : 2, THREADS = 128 * WGS;
    constexpr int TILE_Q = BM * D * 2, TILE_KV = BN * D * 2;
    static_assert(TMA || !RELEASE, "stage release needs the TMA loads");
    static_assert(!WS || (RELEASE && WGS >= 2), "the producer warpgroup serves its consumers by release");
    static_assert(WS != 2 || WGS == 2, "ping-pong takes turns between two consumers");
    // Calls without a bias and a key mask run a copy built without their code, whose registers
    // then suffice for the common tiles (the launcher picks BIAS_MASK = true for the others).
    if constexpr (!BIAS_MASK) {
        bias = nullptr;
        mask = nullptr;
    }
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    unsigned char* sQ = smem;
    unsigned char* sK = smem + TILE_Q;
    unsigned char* sV = sK + STAGES * TILE_KV;
    // TMA: full[s] (K stage s), full[STAGES + s] (V stage s); the n-th fill of a stage completes
    // its phase n, so tile t waits for parity (t / STAGES) & 1.
    unsigned long long* full = reinterpret_cast<unsigned long long*>(sV + STAGES * TILE_KV);
    // RELEASE: empty[s] / empty[STAGES + s] complete when every warp is done with K / V stage s.
    unsigned long long* empty = full + 2 * STAGES;

    int m0, bh;
    row_tile_heavy_first(BM, I, m0, bh);
    const HeadSlices<T> head(bh, H, HK, J, D, k, v, mask);
    const int bi = head.bi, hi = head.hi, hki = head.hki;
    const T* kb = head.kb;
    const T* vb = head.vb;
    const unsigned char* mask_b = head.mask_b;
    // wg: this consumer warpgroup (-1 for WS's producer warpgroup 0).
    const int wg = (int)(threadIdx.x / 128) - (WS ? 1 : 0), warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const T* qb = q + ((long long)bh * I + m0) * D;
    const BiasView<T> bview{bias, bias_sb, bias_sh, bias_si};
    const int n_tiles = (key_end(m0, BM, I, J, causal) + BN - 1) / BN;
    // stagger (without a causal mask): the CTA of row tile r walks the key tiles from tile
    // r mod n_tiles on, wrapping round, so the CTAs of one head read different K/V tiles at any
    // one time instead of all the same one (the order is free: no running max). `tile` below
    // counts steps (ring stage, phase); key_tile(tile) is the tile that step reads. Left out of
    // the bias/mask copy, whose registers are short already (it spilled more with it).
    const int rot = !BIAS_MASK && stagger && !causal && n_tiles > 0 ? (m0 / BM) % n_tiles : 0;
    auto key_tile = [&](int tile) { const int kt = tile + rot; return kt >= n_tiles ? kt - n_tiles : kt; };

    // The key tile of step `tile` into its ring stage: TMA boxes of 64 columns x BN rows (one
    // sw128 slab each; rows past J arrive as zeros), issued by thread 0; or cp.async by every
    // thread.
    auto load_kv = [&](unsigned char* ring, const T* src, const TmaMap& map, int bar, int tile) {
        unsigned char* dst = ring + (tile % STAGES) * TILE_KV;
        const int n0 = key_tile(tile) * BN;
        if constexpr (TMA) {
            if (threadIdx.x == 0) {
                // RELEASE: the stage's previous tile (tile - STAGES) must have been released.
                if (RELEASE && tile >= STAGES)
                    mbar_wait(empty + bar + tile % STAGES, (tile / STAGES - 1) & 1);
                unsigned long long* b = full + bar + tile % STAGES;
                mbar_arrive_expect(b, TILE_KV);
#pragma unroll
                for (int slab = 0; slab < D / 64; ++slab)
                    tma_load_3d(dst + slab * BN * 128, &map, slab * 64, n0, bi * HK + hki, b);
            }
        } else {
            load_tile_sw128<BN, D, THREADS>(reinterpret_cast<T*>(dst), src + (long long)n0 * D, J - n0);
        }
    };
    auto load_k = [&](int tile) { load_kv(sK, kb, tmap_k, 0, tile); };
    auto load_v = [&](int tile) { load_kv(sV, vb, tmap_v, STAGES, tile); };
    // TMA: wait until K(tile) / V(tile) have landed (cp.async: the per-tile barrier covers it).
    auto wait_k = [&](int tile) { if constexpr (TMA) mbar_wait(full + tile % STAGES, (tile / STAGES) & 1); };
    auto wait_v = [&](int tile) { if constexpr (TMA) mbar_wait(full + STAGES + tile % STAGES, (tile / STAGES) & 1); };
    // RELEASE: this warp's wgmmas reading K(tile) / V(tile) are complete (waited for).
    auto release = [&](int bar, int tile) {
        if constexpr (RELEASE) {
            __syncwarp();
            if (lane == 0) mbar_arrive(empty + bar + tile % STAGES);
        }
    };
    // Q as A fragments in registers (QREG: D/4 registers per thread, loaded once from the smem
    // tile): QK^T then reads only K from shared memory, half the smem traffic of the SS form,
    // whose m64n64k16 steps need the full 128 B/clock of shared memory bandwidth.
    u32 qa[QREG ? D / 16 : 1][4];
    // S = Q K^T for this warpgroup's 64 rows: D/16 k-steps of m64nBNk16, K K-major in smem, Q
    // from registers (QREG) or K-major in smem.
    auto issue_qk = [&](float (&s)[BN / 2], int tile) {
        const unsigned char* kt = sK + (tile % STAGES) * TILE_KV;
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < ((CATTN_DIAG & 8) ? 0 : D / 16); ++kk) {
            const unsigned long long db = sw128_desc(kt + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024);
            if constexpr (QREG) {
                Wgmma<BN, T>::template rs<0>(s, qa[kk], db, kk > 0);
            } else {
                const unsigned long long da = sw128_desc(sQ + (kk / 4) * BM * 128 + wg * 64 * 128 + (kk % 4) * 32, 16, 1024);
                Wgmma<BN, T>::ss(s, da, db, kk > 0);
            }
        }
        wgmma_commit();
    };
    float o[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    u32 p[BN / 16][4];
    // O += P V: BN/16 k-steps of m64nDk16, P from registers, V MN-major (keys are K).
    auto issue_pv = [&](int tile) {
        const unsigned char* vt = sV + (tile % STAGES) * TILE_KV;
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < ((CATTN_DIAG & 4) ? 0 : BN / 16); ++kc)
            Wgmma<D, T>::template rs<1>(o, p[kc], sw128_desc(vt + kc * 16 * 128, BN * 128, 1024), 1);
        wgmma_commit();
    };

    const int row0 = m0 + wg * 64 + warp * 16 + g, row1 = row0 + 8;
    float l0 = 0.f, l1 = 0.f;
    // P = exp2(S c + bias - shift) in place, hidden keys 0. HAS_BIAS and CHECK (per-key tests:
    // 0 none, 1 the bounds and causal compares, 2 those and the key mask) are literals at every
    // call, so each inlined copy is specialised: the common tile runs straight-line FFMA + MUFU,
    // and the register pressure of the bias and mask loads stays in the copies that need them
    // (with one general copy, ptxas spilled on every tile).
    auto exp_tile = [&](const bool HAS_BIAS, const int CHECK, float (&s)[BN / 2], int n0) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) {
            const int row = (i & 2) ? row1 : row0;
            const int col = n0 + (i / 4) * 8 + 2 * t + (i & 1);
            float off = -c_shift;
            if (HAS_BIAS) off += bview.log2_at(bi, hi, min(row, I - 1), min(col, J - 1));
            float x = fmaf(s[i], c_scale, off);
            if (CHECK == 1 && (col >= J || (causal && col > row + (J - I)))) x = -INFINITY;
            if (CHECK == 2 && !key_visible(mask_b, row, col, I, J, causal)) x = -INFINITY;
            s[i] = (CATTN_DIAG & 2) ? x : fast_exp2(x);
        }
    };
    auto softmax_exp = [&](float (&s)[BN / 2], int tile) {
        const int n0 = key_tile(tile) * BN;
        const bool check = (causal && n0 + BN - 1 > m0 + (J - I)) || (n0 + BN > J);
        if (bias != nullptr) exp_tile(true, check || mask_b != nullptr ? 2 : 0, s, n0);
        else if (mask_b != nullptr) exp_tile(false, 2, s, n0);
        else if (check) exp_tile(false, 1, s, n0);
        else exp_tile(false, 0, s, n0);
    };
    // Row sums and the P fragments (A operand of PV) from the probabilities.
    auto to_p = [&](const float (&s)[BN / 2]) {
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
            const float* e = s + 8 * kc;
            l0 += (e[0] + e[1]) + (e[4] + e[5]);
            l1 += (e[2] + e[3]) + (e[6] + e[7]);
            p[kc][0] = Pack<T>::from_floats(e[0], e[1]);
            p[kc][1] = Pack<T>::from_floats(e[2], e[3]);
            p[kc][2] = Pack<T>::from_floats(e[4], e[5]);
            p[kc][3] = Pack<T>::from_floats(e[6], e[7]);
        }
    };

    if constexpr (TMA) {
        if (threadIdx.x == 0) {
            for (int b = 0; b < 2 * STAGES; ++b) {
                mbar_init(full + b, 1);
                if (RELEASE) mbar_init(empty + b, 4 * WGS);
            }
            mbar_init_fence();
        }
        __syncthreads();
    }
    if constexpr (WS) {
        if (wg < 0) {   // the producer warpgroup: K(t), V(t) in order, each once its stage is free
            setmaxnreg_dec<24>();
            if (threadIdx.x == 0) {
                for (int tile = 0; tile < n_tiles; ++tile) {
                    load_k(tile);
                    load_v(tile);
                }
            }
            return;
        }
        // the producer's registers go to the consumers: 24 + 2 x 240 or 24 + 3 x 160 per lane (of 512)
        setmaxnreg_inc<WGS == 2 ? 240 : 160>();
    }
    // Q by the consumer threads (cp.async, once); without WS thread 0 starts the K/V ring too.
    load_tile_sw128<BM, D, THREADS>(reinterpret_cast<T*>(sQ), qb, I - m0);
    if (!WS && n_tiles > 0) load_k(0);
    if (!WS && n_tiles > 1) load_k(1);
    if (!WS && n_tiles > 0) load_v(0);
    cp_async_commit();
    cp_async_wait<0>();
    fence_async_smem();
    if constexpr (WS) named_barrier_sync(1, THREADS);
    else __syncthreads();
    if constexpr (QREG) {
        // The mma A-fragment layout: rows 16 warp + g (+8), columns 16 kk + 2t (+1) (+8).
        const int r = wg * 64 + warp * 16 + g;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            const int c = kk * 16 + 2 * t;
            qa[kk][0] = *reinterpret_cast<const u32*>(sQ + sw128_offset<BM>(r, c));
            qa[kk][1] = *reinterpret_cast<const u32*>(sQ + sw128_offset<BM>(r + 8, c));
            qa[kk][2] = *reinterpret_cast<const u32*>(sQ + sw128_offset<BM>(r, c + 8));
            qa[kk][3] = *reinterpret_cast<const u32*>(sQ + sw128_offset<BM>(r + 8, c + 8));
        }
    }
    // WS = 2: consumer w issues a group of products only on its turn (barrier 2 + w), then hands
    // the turn over; consumer 0 starts, and consumer 1's last hand-over is left out, so every
    // barrier sees as many arrivals as waits.
    auto take_turn = [&]() { if constexpr (WS == 2) named_barrier_sync(2 + wg, THREADS); };
    auto pass_turn = [&](bool last) {
        if constexpr (WS == 2) {
            if (!(wg == 1 && last)) named_barrier_arrive(3 - wg, THREADS);
        }
    };
    if (WS == 2 && wg == 1 && n_tiles > 0) named_barrier_arrive(2, THREADS);
    pin(o);   // the zeroing of O must not sink past the first wgmma issue (C7515)
    if (n_tiles > 0) {
        float s[BN / 2];
        wait_k(0);
        take_turn();
        issue_qk(s, 0);
        pass_turn(false);
        wgmma_wait<0>();
        pin(s);
        release(0, 0);
        softmax_exp(s, 0);
        to_p(s);
    }
    // Key tile t: S(t+1) and O += P(t) V(t) issued together; the exponentials of S(t+1) run while
    // the tensor cores do P(t) V(t). Straight-line between issue and wait, so ptxas can see
    // which accumulators are complete (else it serialises the wgmmas: C7514/C7515).
    for (int tile = 0; tile < n_tiles; ++tile) {
        // Every warpgroup has finished the previous tile (its wgmmas included), so the K(tile),
        // V(tile-1) buffers may be refilled; cp.async: K(tile+1), V(tile) have landed too.
        if constexpr (!TMA) {
            cp_async_wait<0>();
            fence_async_smem();
        }
        if constexpr (!RELEASE && !(CATTN_DIAG & 16)) __syncthreads();
        if (!WS && tile + 2 < n_tiles) load_k(tile + 2);
        if (!WS && tile + 1 < n_tiles) load_v(tile + 1);
        if constexpr (!TMA) cp_async_commit();
        if (tile + 1 < n_tiles) {
            float s[BN / 2];
            wait_k(tile + 1);
            wait_v(tile);
            take_turn();
            issue_qk(s, tile + 1);
            issue_pv(tile);
            pass_turn(false);
            wgmma_wait<1>();
            pin(s);
            release(0, tile + 1);
            softmax_exp(s, tile + 1);
            wgmma_wait<0>();
            pin(p);
            pin(o);
            release(STAGES, tile);
            to_p(s);
        } else {
            wait_v(tile);
            take_turn();
            issue_pv(tile);
            pass_turn(true);
            wgmma_wait<0>();
            pin(o);
        }
    }

    l0 = quad_sum(l0);
    l1 = quad_sum(l1);
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
    T* ob = out + (long long)bh * I * D;
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
        store_out_pair(ob, row0, I, D, db * 8 + 2 * t, o[db * 4 + 0] * inv0, o[db * 4 + 1] * inv0);
        store_out_pair(ob, row1, I, D, db * 8 + 2 * t, o[db * 4 + 2] * inv1, o[db * 4 + 3] * inv1);
    }
    if (t == 0) {
        store_lse(lse + (long long)bh * I, row0, I, l0, c_shift);
        store_lse(lse + (long long)bh * I, row1, I, l1, c_shift);
    }
}
