// Hopper backward (sm_90a): the contract and arguments of attn_bwd_kv_mma<DP, T, true> in
// cosine_bwd.cu (dK, dV written once; dQ and broadcast-bias gradients added in fp32), on wgmma.
// The deterministic dQ pass stays on the sm_80 kernels.
//
// One CTA = WGS warpgroups of 64 keys each (default 2; at d = 64 WGS = 1 fits two CTAs per SM;
// d = 256: see below); K and V stay in 128B-swizzled smem (sm90.cuh). The CTA walks the
// query tiles (BM rows: 128 at d = 64, else 64) of every query head of its k/v head, Q, dO and
// the tile's row statistics double-buffered: by TMA from one thread (TMA; tensor maps tmap_q,
// tmap_do over (B*H, I, D), the statistics by a bulk copy) or by cp.async from every thread.
// Row statistics (`stats`, written by prep.cu's pack_row_stats): per (batch·head, query tile),
// BM values of lse·log2(e) then BM of delta, the rows past I padded with +inf (P = 0 there) and
// 0, so each tile's are one aligned 2·BM·4-byte block. Per query tile, each warpgroup:
//   S^T = K Q^T, dP^T = V dO^T                      (issue_sdp: wgmma, operands K-major in smem)
//   P^T = exp2(S^T c + bias - lse)                  (to_p: registers)
//   dS^T = P^T (dP^T - delta)                       (to_ds: registers; dS^T -> smem)
//   dV += P^T dO, dK += dS^T Q                      (issue_grad: A from registers, dO/Q MN-major)
//   barrier (dS^T of every warpgroup in smem)
//   dQ  = dS K over a slice                         (issue_dq: dS and K MN-major in smem)
//   dQ -> global fp32: bulk reduce-add of each warp's rows staged in smem, or atomics
// OVERLAP commits S^T, dP^T and dV as groups of their own and waits for one at a time: the
// exponentials of P^T run while the tensor cores compute dP^T, dS^T while they compute dV.
// dQ slices: d = 128 splits the head dim (warpgroup w: columns 64w.., all 128 keys); d = 64 with
// BM = 64 splits the keys (warpgroup w: its own 64 keys, all columns). 32 accumulators each.
// The phases of a tile run one after the other; two CTAs per SM (or two warpgroups) overlap them.
// d = 64 with 128-query tiles, OVERLAP 2 (DEFER): dQ of tile t is issued at the top of tile t+1
// and added to global memory while S^T of t+1 runs, with dS^T double-buffered: one CTA barrier
// per tile instead of two, and the dQ wait no longer closes the tile.
// (Issuing tile t+1's S^T/dP^T before tile t's gradient products, so the exponentials run under
// them, was measured no faster at d = 64: benchmarks/NOTES.md.)
//
// d = 256: dK and dV of 64 keys over all 256 columns would take 256 registers per thread, so the
// output columns are split in halves: each half computes S^T and dP^T over the whole head dim
// (that work is done twice) and dV, dK, dQ for its 128 columns only, dQ in two 64-column parts;
// 64 keys, 64-query tiles. WGS = 1: a half per CTA (blockIdx.y), one warpgroup per SM (220 KiB of
// shared memory); WGS = 2 (COL_WGS): both halves in one CTA, a warpgroup each over the same 64
// keys, so K, V, Q and dO are loaded once for both and two warpgroups share the SM (dQ only by
// vector reductions from registers, DQ = 4 or 0, for want of room to stage it). OVERLAP 2 there
// (ROLE, 218 KiB) splits S^T and dP^T between the warpgroups instead of computing both twice:
// warpgroup 0 computes S^T and P^T and hands P^T (fp32, in fragment order) to warpgroup 1
// through shared memory and a named barrier; warpgroup 1 computes dP^T, then dS^T into the smem
// tile; each adds its dV half with P^T from registers, warpgroup 1 its dK half with dS^T from
// registers, warpgroup 0 after the dS^T barrier with dS^T from the smem tile. Otherwise (202 KiB)
// both compute S^T, dP^T and dS^T, and warpgroup 0 alone writes the dS^T tile.
//
// Query tiles of BM = 128 (d = 64, two warpgroups): S^T and dP^T are m64n128 products, and each
// warpgroup adds the dQ of its own 64 query rows over all 128 keys of the CTA, which halves the
// fp32 reduce-add traffic per (query, key) pair against BM = 64 with keys split.
// DQ: 0 = fp32 atomics; 1 = copy-engine bulk reduce-add, one row (DQ_N floats) per operation;
// 2 = one operation per warp for its 16 whole rows (4 KiB contiguous at d = 64; DQ_N = D only);
// 3 = TMA tensor reduce-add (tensor map tmap_dq over dq_acc (B*H, I, D) fp32, boxes of 16 rows x
// 32 columns with the 128-byte swizzle): two operations per warp and 64 columns, issued by one
// lane. (A bulk operation takes its addresses from uniform registers, so the 16 per-lane rows of
// mode 1 are issued one lane after another: ncu put a fifth of the d = 128 backward's stall
// samples on that loop.) 4 = vector reductions (red.v2.f32) of each thread's column pairs
// straight from registers: no staging, so no shared-memory traffic for dQ (modes 1-3 write and
// then read 8 bytes of shared memory per element, at d = 128 about a sixth of the tile's total).
#include "attn_common.cuh"
#include "sm90.cuh"
using namespace cattn;

#ifndef CATTN_DIAG
#define CATTN_DIAG 0   // phase probe (benchmarks/phase_probe.py): bits leave stages out; results wrong
#endif

template <int D, typename T, int DQ, int WGS, int BM, bool TMA, int OVERLAP>
__global__ void __launch_bounds__(128 * WGS, WGS == 1 ? 2 : 1)
attn_bwd_wgmma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const T* __restrict__ dout, const float* __restrict__ stats, const T* __restrict__ bias, const unsigned char* __restrict__ mask,
               float* __restrict__ dq_acc, float* __restrict__ dk_out, T* __restrict__ dv_out,
               T* __restrict__ dbias, float* __restrict__ dbias_acc,
               long long bias_sb, long long bias_sh, long long bias_si,
               int B, int H, int HK, int I, int J, int Dim, int causal, float scale, float c_scale,
               const __grid_constant__ TmaMap tmap_q, const __grid_constant__ TmaMap tmap_do,
               const __grid_constant__ TmaMap tmap_dq, int stagger) {
    static_assert(WGS == 2 || D == 64 || D == 256, "one warpgroup per CTA only at d = 64 and 256 (dQ registers)");
    static_assert(D != 256 || BM == 64, "d = 256: 64-query tiles (shared memory)");
    static_assert(BM == 64 || (BM == 128 && D == 64 && WGS == 2), "128-query tiles: d = 64, 2 warpgroups");
    // COL_WGS (d = 256, two warpgroups): the warpgroups split the output columns, not the keys.
    constexpr bool COL_WGS = D == 256 && WGS == 2;
    static_assert(!COL_WGS || DQ == 0 || DQ == 4, "d = 256 with two warpgroups: no room to stage dQ");
    constexpr int BN = COL_WGS ? 64 : 64 * WGS, THREADS = 128 * WGS;
    constexpr bool ROLE = COL_WGS && OVERLAP == 2;
    // ROLE branches on the warpgroup around wgmmas: a warp-uniform value (shuffled from lane 0)
    // lets ptxas see that no warp diverges there; else it serialises every wgmma (C7520).
    const int wg = ROLE ? __shfl_sync(0xffffffffu, threadIdx.x / 128, 0) : threadIdx.x / 128;
    const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
    const int kwg = COL_WGS ? 0 : wg;   // which 64 keys of the CTA this warpgroup takes
    // Output columns of this warpgroup: all of them, or one half at d = 256 (blockIdx.y, or the
    // warpgroup with COL_WGS).
    constexpr int DO = D == 256 ? D / 2 : D;
    const int col_base = D == 256 ? (COL_WGS ? wg : (int)blockIdx.y) * DO : 0;   // a constant 0 elsewhere
    constexpr int TILE_KV = BN * D * 2, TILE_Q = BM * D * 2, TILE_DS = BN * BM * 2;
    // dQ slice of warpgroup w: SPLIT_Q (BM = 128): query rows 64w.., all keys, all columns;
    // SPLIT_D (d >= 128): DQ_PARTS slabs of 64 columns each, all keys, all queries; else its own
    // 64 keys (partial sums).
    constexpr bool SPLIT_Q = BM == 128, SPLIT_D = D >= 128;
    constexpr int DQ_N = SPLIT_D ? 64 : D, DQ_KEYS = (SPLIT_Q || SPLIT_D) ? BN : 64;
    constexpr int DQ_PARTS = SPLIT_D ? DO / 64 / (BN / 64) : 1;
    // OVERLAP 2 (d = 128, TMA loads; d = 256 with two warpgroups: ROLE, below; elsewhere it runs
    // as 1): at d = 128 dQ is issued before dK and waited
    // for with dV, so dK runs under the dQ store and under the next tile's S^T/dP^T issue; the
    // tile after next is loaded once the last tile's dK is done (after the dS^T barrier), into a
    // third stage. (At d = 64 with 128-query tiles the registers of both tiles do not fit: ptxas
    // serialises the wgmmas, C7512; the other layouts were neither measured nor tested with it.)
    constexpr bool REORDER = OVERLAP == 2 && D == 128 && TMA;
    static_assert(!REORDER || (DQ_PARTS == 1 && BM == 64), "one dQ slice per warpgroup, 64-query tiles");
    constexpr int STAGES = REORDER ? 3 : 2;
    // OVERLAP 2 at d = 64 with 128-query tiles (DEFER): the dQ of tile t is issued at the top of
    // tile t+1, in front of its S^T and dP^T, and added to global memory while they run, so the
    // tile needs one CTA barrier instead of two and the dQ products and reductions no longer
    // close it; dS^T is double-buffered for that (tile t+1 writes one buffer while dQ of tile t
    // reads the other).
    constexpr bool DEFER = OVERLAP == 2 && SPLIT_Q;
    constexpr int DS_BUFS = DEFER ? 2 : 1;
    // The warpgroup that writes the dS^T tile and the bias gradient when both column halves
    // compute dS^T (COL_WGS: warpgroup 0, or the one that alone computes it, 1; one CTA per half:
    // each writes its own tile, the first half the bias gradient).
    const bool writes_ds = !COL_WGS || wg == (ROLE ? 1 : 0);
    const bool writes_dbias = COL_WGS ? writes_ds : col_base == 0;
    static_assert(!SPLIT_D || DQ_PARTS * BN == DO, "dQ column slabs cover the warpgroups' columns");
    static_assert(DQ != 2 || DQ_N == D, "whole-row dQ blocks need every column in one warpgroup");
    static_assert(DQ != 3 || DQ_N == 64, "TMA dQ: two 32-column boxes per warp");
    constexpr bool BULK_DQ = DQ >= 1 && DQ <= 3;   // staged in smem, added by the copy engine
    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    unsigned char* sK = smem;
    unsigned char* sV = sK + TILE_KV;
    unsigned char* sQ = sV + TILE_KV;               // STAGES tiles
    unsigned char* sO = sQ + STAGES * TILE_Q;       // dO, STAGES tiles
    unsigned char* sdS = sO + STAGES * TILE_Q;      // dS^T: keys x queries, sw128 (DS_BUFS tiles)
    float* sP = reinterpret_cast<float*>(sdS + DS_BUFS * TILE_DS);   // ROLE: P^T, fp32
    float* sLD = sP + (ROLE ? BN * BM : 0);                          // STAGES x (BM lse, BM delta)
    constexpr int LD_FLOATS = (2 * STAGES * BM + 255) / 256 * 256;   // to 1 KiB
    // Shared addresses >> 4 of the wgmma operand tiles, for their descriptors (sw128_desc_at).
    const u32 k4 = smem_addr(sK) >> 4, v4 = smem_addr(sV) >> 4, q4 = smem_addr(sQ) >> 4;
    const u32 o4 = smem_addr(sO) >> 4, ds4 = smem_addr(sdS) >> 4;
    // fp32 row of a staged dQ slice: padded against bank conflicts for DQ 1; dense for DQ 3,
    // whose per-warp 4 KiB blocks stay 1024-byte aligned for the swizzle (every region before
    // sdQ is a multiple of 1 KiB).
    constexpr int SDQ = DQ == 2 ? D : DQ == 3 ? DQ_N : DQ_N + 8;
    float* sdQ = sLD + LD_FLOATS;                                    // BULK_DQ: per warp 16 x SDQ
    // TMA: full[s] completes when Q and dO of stage s have landed (phase n = the n-th fill).
    unsigned long long* full = reinterpret_cast<unsigned long long*>(sdQ + (BULK_DQ ? 4 * WGS * 16 * 72 : 0));

    const int n_key_tiles = (J + BN - 1) / BN;
    const int n0 = (int)(blockIdx.x % n_key_tiles) * BN;
    const int bhk = blockIdx.x / n_key_tiles, bi = bhk / HK, hki = bhk % HK;
    const int group = H / HK;
    const int g = lane / 4, t = lane % 4;
    const long long kv_off = ((long long)bhk * J + n0) * D;
    const unsigned char* mask_b = mask ? mask + (long long)bi * J : nullptr;
    const BiasView<T> bview{bias, bias_sb, bias_sh, bias_si};
    const BiasGrad<T> bgrad{dbias, dbias_acc, bias_sb, bias_sh, bias_si};

    // Query rows that see some key of this tile (causal: r >= n0 - (J - I)).
    const int m_first = causal ? max(0, n0 - (J - I)) : 0;
    const int t_first = m_first / BM, n_q_tiles = (I + BM - 1) / BM;
    const int per_head = max(0, n_q_tiles - t_first), total = per_head * group;
    // stagger (without a causal mask, whose CTAs start at their diagonals anyway): the CTA of key
    // tile kt walks each head's query tiles from tile kt mod per_head on, wrapping round, so the
    // CTAs of one head read different Q/dO tiles and add into different dQ rows at any one time,
    // instead of all adding into the same rows together (the order of the sums is free).
    const int rot = stagger && !causal && per_head > 0 ? (int)(blockIdx.x % n_key_tiles) % per_head : 0;
    auto head_of = [&](int it) { return hki * group + it / per_head; };
    auto row0_of = [&](int it) {
        const int step = it % per_head + rot;
        return (t_first + (step >= per_head ? step - per_head : step)) * BM;
    };

    load_tile_sw128<BN, D, THREADS>(reinterpret_cast<T*>(sK), k + kv_off, J - n0);
    load_tile_sw128<BN, D, THREADS>(reinterpret_cast<T*>(sV), v + kv_off, J - n0);
    // Q, dO and the row statistics of query tile `it`, all asynchronous (a plain global load
    // here would stall its warps for a full memory latency every tile). Q and dO rows past the
    // end arrive as zeros. (The statistics once came by a cp.async per row: the proxy fence of
    // the dQ staging then waited for those loads, and their row arithmetic took many issue
    // slots: ncu, benchmarks/NOTES.md v9.)
    auto load_q_tile = [&](int it) {
        const int stage = it % STAGES, m0 = row0_of(it);
        const long long qoff = (long long)(bi * H + head_of(it)) * I + m0;
        const float* stats_src = stats + ((long long)(bi * H + head_of(it)) * n_q_tiles + m0 / BM) * 2 * BM;
        float* stats_dst = sLD + stage * 2 * BM;
        if constexpr (TMA) {
            if (threadIdx.x == 0) {
                mbar_arrive_expect(full + stage, 2 * TILE_Q + 2 * BM * 4);
                bulk_load(stats_dst, stats_src, 2 * BM * 4, full + stage);
#pragma unroll
                for (int slab = 0; slab < D / 64; ++slab) {
                    const int at = stage * TILE_Q + slab * BM * 128, bh = bi * H + head_of(it);
                    tma_load_3d(sQ + at, &tmap_q, slab * 64, m0, bh, full + stage);
                    tma_load_3d(sO + at, &tmap_do, slab * 64, m0, bh, full + stage);
                }
            }
        } else {
            load_tile_sw128<BM, D, THREADS>(reinterpret_cast<T*>(sQ + stage * TILE_Q), q + qoff * D, I - m0);
            load_tile_sw128<BM, D, THREADS>(reinterpret_cast<T*>(sO + stage * TILE_Q), dout + qoff * D, I - m0);
            for (int c = threadIdx.x; c < 2 * BM / 4; c += THREADS) cp_async_16(stats_dst + 4 * c, stats_src + 4 * c, 16);
        }
    };

    // S^T = K Q^T or dP^T = V dO^T of tile `it` (A = K or V, B = Q or dO stage): this
    // warpgroup's 64 keys x BM queries, issued without a commit.
    auto issue_product = [&](float (&acc)[BM / 2], u32 a4, u32 b4, int it) {
        const int so = (it % STAGES) * TILE_Q;
#pragma unroll
        for (int kk = 0; kk < ((CATTN_DIAG & 8) ? 0 : D / 16); ++kk) {
            const int a_off = (kk / 4) * BN * 128 + kwg * 64 * 128 + (kk % 4) * 32;
            const int b_off = so + (kk / 4) * BM * 128 + (kk % 4) * 32;
            Wgmma<BM, T>::ss(acc, sw128_desc_at<16, 1024>(a4, a_off), sw128_desc_at<16, 1024>(b4, b_off), kk > 0);
        }
    };
    // S^T and dP^T of tile `it`: one commit group; or (OVERLAP) two, S^T first, so the
    // exponentials can start while the tensor cores still work on dP^T.
    auto issue_sdp = [&](float (&st)[BM / 2], float (&dpt)[BM / 2], int it) {
        wgmma_fence();
        issue_product(st, k4, q4, it);
        if constexpr (OVERLAP) wgmma_commit();
        issue_product(dpt, v4, o4, it);
        wgmma_commit();
    };

    // Element i of st/dpt: key row (i & 2 ? key1 : key0), query column m0 + 8(i/4) + 2t + (i&1).
    const int key0 = n0 + kwg * 64 + warp * 16 + g, key1 = key0 + 8;   // this thread's key rows
    auto query_col = [&](int i) { return (i / 4) * 8 + 2 * t + (i & 1); };
    // The row values (lse·log2(e) or delta of tile `it`) of this thread's 4 query columns in
    // k-chunk kc: 16 kc + 2t (+1) and 16 kc + 8 + 2t (+1); element u of the chunk takes entry
    // (u >= 4 ? 2 : 0) + (u & 1).
    auto chunk_cols = [&](int it, bool delta_row, int kc) {
        const float* rows = sLD + (it % STAGES) * 2 * BM + (delta_row ? BM : 0);
        const float2 lo = *reinterpret_cast<const float2*>(rows + 16 * kc + 2 * t);
        const float2 hi = *reinterpret_cast<const float2*>(rows + 16 * kc + 8 + 2 * t);
        return make_float4(lo.x, lo.y, hi.x, hi.y);
    };
    auto entry = [](const float4& v, int u) {
        const int e = (u >= 4 ? 2 : 0) + (u & 1);
        return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
    };
    // A whole tile's row values in registers, read before the wgmmas they follow (lse before
    // the tile's products are issued, delta before the dP^T wait): their shared-memory latency,
    // long behind the wgmma operand reads, then passes under the tensor cores instead of in front
    // of the exponentials (64-query tiles; 128-query tiles read them chunk by chunk where they
    // are used: registers; delta as early as lse spills at d = 128).
    constexpr bool EARLY_ROWS = BM == 64;
    struct RowVals { float4 v[BM / 16]; };
    auto tile_cols = [&](int it, bool delta_row) {
        RowVals r;
#pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc) r.v[kc] = chunk_cols(it, delta_row, kc);
        return r;
    };
    // P^T = exp2(S^T c + bias - lse) of tile `it`, in place in st and as 16-bit A fragments pa;
    // nl: the tile's lse·log2(e) in registers (tile_cols), or null to read them from shared
    // memory chunk by chunk. HAS_BIAS and CHECK (per-key
    // visibility tests: 0 none, 1 only the causal test, 2 all) are literals at every call, so each inlined copy is specialised: the common tile (no bias, no
    // mask, not on the causal diagonal) runs straight-line code, a diagonal one a compare and
    // select more. (Query rows past I need no test: their lse is +inf, so P = 0.)
    auto to_p_as = [&](const bool HAS_BIAS, const int CHECK, float (&st)[BM / 2], const RowVals* nl, int it,
                       u32 (&pa)[BM / 16][4]) {
        const int hq = head_of(it), m0 = row0_of(it);
#pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc) {
            const float4 l = nl ? nl->v[kc] : chunk_cols(it, false, kc);
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = 8 * kc + u, key = (i & 2) ? key1 : key0, row = m0 + query_col(i);
                float x = st[i] * c_scale - entry(l, u);
                if (HAS_BIAS) x += bview.log2_at(bi, hq, min(row, I - 1), min(key, J - 1));
                float p = (CATTN_DIAG & 2) ? x : fast_exp2(x);
                if (CHECK == 2) {
                    if (!key_visible(mask_b, row, key, I, J, causal)) p = 0.f;
                }
                if (CHECK == 1 && key > row + (J - I)) p = 0.f;
                st[i] = p;
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) pa[kc][e] = Pack<T>::from_floats(st[8 * kc + 2 * e], st[8 * kc + 2 * e + 1]);
        }
    };
    // dS^T = P^T (dP^T - delta) of tile `it` (P^T in st) as A fragments sa and into its smem
    // tile; the bias gradient (HAS_BIAS, a literal) once per (query, key): by one column half
    // at d = 256 (writes_dbias).
    auto to_ds_as = [&](const bool HAS_BIAS, const float (&st)[BM / 2], const float (&dpt)[BM / 2],
                        const RowVals* dl, int it, u32 (&sa)[BM / 16][4]) {
        const int hq = head_of(it), m0 = row0_of(it);
#pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc) {
            const float4 dc = dl ? dl->v[kc] : chunk_cols(it, true, kc);
            float se[8];
#pragma unroll
            for (int u = 0; u < 8; ++u) {
                const int i = 8 * kc + u;
                se[u] = st[i] * (dpt[i] - entry(dc, u));
                if (HAS_BIAS) {
                    if (st[i] != 0.f && writes_dbias)
                        bgrad.put(bi, hq, m0 + query_col(i), (i & 2) ? key1 : key0, se[u]);
                }
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) sa[kc][e] = Pack<T>::from_floats(se[2 * e], se[2 * e + 1]);
            // dS^T to smem, row = local key, column = local query: pairs of queries per store.
            const int kl0 = kwg * 64 + warp * 16 + g, qc0 = kc * 16 + 2 * t;
            if ((CATTN_DIAG & 16) || !writes_ds) continue;
            unsigned char* ds = sdS + (it % DS_BUFS) * TILE_DS;
            *reinterpret_cast<u32*>(ds + sw128_offset<BN>(kl0, qc0)) = sa[kc][0];
            *reinterpret_cast<u32*>(ds + sw128_offset<BN>(kl0 + 8, qc0)) = sa[kc][1];
            *reinterpret_cast<u32*>(ds + sw128_offset<BN>(kl0, qc0 + 8)) = sa[kc][2];
            *reinterpret_cast<u32*>(ds + sw128_offset<BN>(kl0 + 8, qc0 + 8)) = sa[kc][3];
        }
    };
    // The specialised copies for tile `it`; nl, dl as for to_p_as / to_ds_as.
    auto to_p = [&](float (&st)[BM / 2], const RowVals* nl, int it, u32 (&pa)[BM / 16][4]) {
        const int m0 = row0_of(it);
        const bool diagonal = causal && n0 + BN - 1 > m0 + (J - I);
        const bool edge = (n0 + BN > J) || mask_b != nullptr;
        if (bias != nullptr || edge) to_p_as(bias != nullptr, diagonal || edge ? 2 : 0, st, nl, it, pa);
        else if (diagonal) to_p_as(false, 1, st, nl, it, pa);
        else to_p_as(false, 0, st, nl, it, pa);
    };
    auto to_ds = [&](const float (&st)[BM / 2], const float (&dpt)[BM / 2], const RowVals* dl, int it,
                     u32 (&sa)[BM / 16][4]) {
        if (bias != nullptr) to_ds_as(true, st, dpt, dl, it, sa);
        else to_ds_as(false, st, dpt, dl, it, sa);
    };

    float dk[DO / 2], dv[DO / 2];
#pragma unroll
    for (int i = 0; i < DO / 2; ++i) dk[i] = dv[i] = 0.f;
    pin(dk);
    pin(dv);

    // dV += P^T dO or dK += dS^T Q (keys x d; k = queries) for tile `it`, A from this warpgroup's
    // registers (so it may be issued before the barrier that publishes dS^T), B = the dO or Q
    // stage, MN-major; no commit.
    auto issue_grad = [&](float (&acc)[DO / 2], const u32 (&a)[BM / 16][4], u32 b4, int it) {
        const int so = (it % STAGES) * TILE_Q + (col_base / 64) * BM * 128;   // first column slab
#pragma unroll
        for (int kc = 0; kc < ((CATTN_DIAG & 4) ? 0 : BM / 16); ++kc)
            Wgmma<DO, T>::template rs<1>(acc, a[kc], sw128_desc_at<BM * 128, 1024>(b4, so + kc * 16 * 128), 1);
    };
    // dQ = dS K (queries x d; k = keys) over this warpgroup's slice (one commit group); dS^T of
    // the tile must be in smem, fenced, behind a barrier.
    auto dq_slab = [&](int part) { return SPLIT_D ? col_base / 64 + kwg * DQ_PARTS + part : 0; };
    auto issue_dq = [&](float (&dq)[DQ_N / 2], int part, int it) {
        const int key_base = (SPLIT_Q || SPLIT_D) ? 0 : wg * 64;   // first key row of the slice
        const int col_slab = dq_slab(part);                        // 64-column slab of K
        const int q_slab = SPLIT_Q ? wg : 0;                       // 64-query slab of dS^T
        const int ds_at = (it % DS_BUFS) * TILE_DS + q_slab * BN * 128;
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < ((CATTN_DIAG & 1) ? 0 : DQ_KEYS / 16); ++kc) {
            const int kr = key_base + kc * 16;
            Wgmma<DQ_N, T>::template ss<1, 1>(dq, sw128_desc_at<1024, 1024>(ds4, ds_at + kr * 128),
                                              sw128_desc_at<BN * 128, 1024>(k4, col_slab * BN * 128 + kr * 128), kc > 0);
        }
        wgmma_commit();
    };

    // OVERLAP (S^T and dP^T committed apart): P^T while the tensor cores do dP^T, dV issued,
    // then dS^T (into pa / sa and the smem tile) while they do dV.
    // nl: the tile's lse in registers (EARLY_ROWS: read before issue_sdp), else null.
    auto p_then_ds = [&](float (&st)[BM / 2], float (&dpt)[BM / 2], int it, u32 (&pa)[BM / 16][4],
                         u32 (&sa)[BM / 16][4], const RowVals* nl) {
        wgmma_wait<1>();
        pin(st);
        to_p(st, nl, it, pa);
        wgmma_fence();
        issue_grad(dv, pa, o4, it);
        wgmma_commit();
        RowVals dl;
        if constexpr (EARLY_ROWS) dl = tile_cols(it, true);
        wgmma_wait<1>();
        pin(dpt);
        to_ds(st, dpt, EARLY_ROWS ? &dl : nullptr, it, sa);
    };

    // ROLE: S^T / P^T in warpgroup 0, dP^T / dS^T in warpgroup 1 (see the top), then the dV halves
    // and warpgroup 1's dK half issued; warpgroup 0's dK half follows the dS^T barrier
    // (issue_dk_from_smem).
    auto role_tile = [&](float (&st)[BM / 2], float (&dpt)[BM / 2], int it, u32 (&pa)[BM / 16][4],
                         u32 (&sa)[BM / 16][4]) {
        float4* p4 = reinterpret_cast<float4*>(sP) + threadIdx.x % 128;   // conflict-free: by thread
        wgmma_fence();
        if (wg == 0) {
            issue_product(st, k4, q4, it);
            wgmma_commit();
            wgmma_wait<0>();
            pin(st);
            to_p(st, nullptr, it, pa);
#pragma unroll
            for (int c = 0; c < BM / 8; ++c) p4[c * 128] = make_float4(st[4 * c], st[4 * c + 1], st[4 * c + 2], st[4 * c + 3]);
            named_barrier_arrive(1, THREADS);   // P^T is in smem
            wgmma_fence();
            issue_grad(dv, pa, o4, it);
            wgmma_commit();
        } else {
            issue_product(dpt, v4, o4, it);
            wgmma_commit();
            wgmma_wait<0>();
            pin(dpt);
            named_barrier_sync(1, THREADS);
#pragma unroll
            for (int c = 0; c < BM / 8; ++c) {
                const float4 p = p4[c * 128];
                st[4 * c] = p.x;
                st[4 * c + 1] = p.y;
                st[4 * c + 2] = p.z;
                st[4 * c + 3] = p.w;
            }
#pragma unroll
            for (int kc = 0; kc < BM / 16; ++kc)
#pragma unroll
                for (int e = 0; e < 4; ++e) pa[kc][e] = Pack<T>::from_floats(st[8 * kc + 2 * e], st[8 * kc + 2 * e + 1]);
            to_ds(st, dpt, nullptr, it, sa);
            wgmma_fence();
            issue_grad(dv, pa, o4, it);
            issue_grad(dk, sa, q4, it);
            wgmma_commit();
        }
    };
    auto issue_dk_from_smem = [&](int it) {
        const int so = (it % STAGES) * TILE_Q + (col_base / 64) * BM * 128;   // first column slab
        wgmma_fence();
#pragma unroll
        for (int kc = 0; kc < BM / 16; ++kc)
            Wgmma<DO, T>::template ss<0, 1>(dk, sw128_desc_at<16, 1024>(ds4, kc * 32),
                                            sw128_desc_at<BM * 128, 1024>(q4, so + kc * 16 * 128), 1);
        wgmma_commit();
    };

    // dQ of tile `it` (complete in registers): rows m0 + q0 + 16 warp + g (+8), columns
    // c0 + 8j + 2t (+1), q0 = 64w for SPLIT_Q, c0 = 64 * dq_slab(part).
    auto store_dq = [&](const float (&dq)[DQ_N / 2], int it, int part) {
        const int m0 = row0_of(it) + (SPLIT_Q ? wg * 64 : 0);
        float* dqb = dq_acc + (long long)(bi * H + head_of(it)) * I * D;
        const int r0 = m0 + warp * 16 + g, r1 = r0 + 8, c0 = 64 * dq_slab(part);
        if constexpr (CATTN_DIAG & 1) {
        } else if constexpr (DQ == 3) {
            // The warp's 16 rows x 64 columns as two 16 x 32 boxes in the TMA's 128-byte swizzle
            // (16-byte chunk c of row r at chunk c ^ (r % 8): the float2 stores of a warp then
            // fall on distinct banks), added to global memory by two tensor operations.
            unsigned char* sw = reinterpret_cast<unsigned char*>(sdQ + (wg * 4 + warp) * 16 * SDQ);
            if (lane == 0) bulk_wait_read();   // the last tile's boxes were read
            __syncwarp();
#pragma unroll
            for (int j = 0; j < DQ_N / 8; ++j) {
                const int col = j * 8 + 2 * t, box = col / 32, chunk = (col % 32) / 4;
                const int at = box * 2048 + ((chunk ^ g) << 4) + (t & 1) * 8;
                *reinterpret_cast<float2*>(sw + at + g * 128) = make_float2(dq[4 * j] * scale, dq[4 * j + 1] * scale);
                *reinterpret_cast<float2*>(sw + at + (g + 8) * 128) = make_float2(dq[4 * j + 2] * scale, dq[4 * j + 3] * scale);
            }
            fence_async_smem();
            __syncwarp();
            if (lane == 0) {
                const int bh = bi * H + head_of(it);
                tma_reduce_add_3d(&tmap_dq, sw, c0, m0 + warp * 16, bh);
                tma_reduce_add_3d(&tmap_dq, sw + 2048, c0 + 32, m0 + warp * 16, bh);
                bulk_commit();
            }
        } else if constexpr (DQ == 4) {
            // Straight from registers, no staging: one vector reduction per column pair, so no
            // shared-memory traffic (the staged modes write and read 2 x 4 bytes per element).
#pragma unroll
            for (int j = 0; j < DQ_N / 8; ++j) {
                const int col = c0 + j * 8 + 2 * t;
                if (r0 < I) red_add_f32x2(dqb + (long long)r0 * D + col, dq[4 * j] * scale, dq[4 * j + 1] * scale);
                if (r1 < I) red_add_f32x2(dqb + (long long)r1 * D + col, dq[4 * j + 2] * scale, dq[4 * j + 3] * scale);
            }
        } else if (BULK_DQ) {
            // Each warp stages its 16 rows in smem; the copy engine adds them to global memory:
            // lanes 0..15 one row each (DQ = 1), or lane 0 all 16 rows at once (DQ = 2: the rows
            // are contiguous in global memory when they span the whole head dim).
            float* sw = sdQ + (wg * 4 + warp) * 16 * SDQ;
            if (DQ == 2 ? lane == 0 : lane < 16) bulk_wait_read();   // the last tile's rows were read
            __syncwarp();
#pragma unroll
            for (int j = 0; j < DQ_N / 8; ++j) {
                const int col = j * 8 + 2 * t;
                *reinterpret_cast<float2*>(sw + g * SDQ + col) = make_float2(dq[4 * j] * scale, dq[4 * j + 1] * scale);
                *reinterpret_cast<float2*>(sw + (g + 8) * SDQ + col) = make_float2(dq[4 * j + 2] * scale, dq[4 * j + 3] * scale);
            }
            fence_async_smem();
            __syncwarp();
            const int row = m0 + warp * 16;
            if (DQ == 2) {
                const int rows = min(16, I - row);
                if (lane == 0 && rows > 0) {
                    bulk_reduce_add_f32(dqb + (long long)row * D, sw, rows * D * 4);
                    bulk_commit();
                }
            } else if (lane < 16 && row + lane < I) {
                bulk_reduce_add_f32(dqb + (long long)(row + lane) * D + c0, sw + lane * SDQ, DQ_N * 4);
                bulk_commit();
            }
        } else {
#pragma unroll
            for (int j = 0; j < DQ_N / 8; ++j) {
                const int col = c0 + j * 8 + 2 * t;
                if (r0 < I) {
                    atomicAdd(dqb + (long long)r0 * D + col, dq[4 * j + 0] * scale);
                    atomicAdd(dqb + (long long)r0 * D + col + 1, dq[4 * j + 1] * scale);
                }
                if (r1 < I) {
                    atomicAdd(dqb + (long long)r1 * D + col, dq[4 * j + 2] * scale);
                    atomicAdd(dqb + (long long)r1 * D + col + 1, dq[4 * j + 3] * scale);
                }
            }
        }
    };

    if constexpr (TMA) {
        if (threadIdx.x == 0) {
            for (int b = 0; b < STAGES; ++b) mbar_init(full + b, 1);
            mbar_init_fence();
        }
        __syncthreads();
    }
    if (total > 0) load_q_tile(0);
    cp_async_commit();
    if constexpr (REORDER) {
        if (total > 1) load_q_tile(1);
        cp_async_commit();
    }
    for (int it = 0; it < total && REORDER; ++it) {
        // Tile `it` has landed, and every warpgroup has waited for its dQ of tile it-1, so dS^T
        // may be rewritten. (The proxy fence orders the K and V loads, by cp.async, before the
        // first wgmma; TMA brings everything later, and a fence per tile would also wait for
        // this thread's outstanding global reductions.)
        cp_async_wait<1>();
        if (it == 0) fence_async_smem();
        __syncthreads();
        float st[BM / 2], dpt[BM / 2];
        if constexpr (TMA) mbar_wait(full + it % STAGES, (it / STAGES) & 1);
        const RowVals nl = tile_cols(it, false);
        issue_sdp(st, dpt, it);
        u32 pa[BM / 16][4], sa[BM / 16][4];
        p_then_ds(st, dpt, it, pa, sa, &nl);   // its first wait also retires dK of tile it-1
        fence_async_smem();
        __syncthreads();    // all of dS^T is in smem, and tile it-1 is done with: refill its stage
        if (it + 2 < total) load_q_tile(it + 2);
        cp_async_commit();
        float dq[DQ_N / 2];
        issue_dq(dq, 0, it);    // its fence also covers the dS^T fragments of dK
        issue_grad(dk, sa, q4, it);
        wgmma_commit();
        wgmma_wait<1>();    // dV and dQ; dK runs on
        pin(dq);
        pin(dv);
        store_dq(dq, it, 0);
    }
    // The top of tile `it` (two stages): a CTA barrier once every warpgroup is done with tile
    // it-1, the next tile's loads into that tile's stage, then the wait for tile `it` to land.
    // (The proxy fence: for tiles loaded by cp.async; with TMA only the first, after K and V.)
    auto begin_tile = [&](int it) {
        cp_async_wait<0>();
        if (!TMA || it == 0) fence_async_smem();
        __syncthreads();
        if (it + 1 < total) load_q_tile(it + 1);
        cp_async_commit();
        if constexpr (TMA) mbar_wait(full + it % STAGES, (it / STAGES) & 1);
    };
    // DEFER: tile `it`; WITH_DQ (a literal: a wgmma issued on only some trips through one copy
    // of the code makes ptxas serialise them all, C7514) issues the dQ of tile it-1 first.
    auto defer_tile = [&](const bool WITH_DQ, int it) {
        // Every warpgroup is done with tile it-1: its products were waited for (so its stage may
        // be refilled) and its dS^T is in smem, fenced (so dQ of tile it-1 may read it).
        begin_tile(it);
        float st[BM / 2], dpt[BM / 2];
        if (WITH_DQ) {
            // dQ of tile it-1 and S^T, a commit group each; dQ is added to global memory while
            // S^T runs, and dP^T issued after that (all three in flight at once spill).
            float dq[DQ_N / 2];
            issue_dq(dq, 0, it - 1);
            wgmma_fence();
            issue_product(st, k4, q4, it);
            wgmma_commit();
            wgmma_wait<1>();
            pin(dq);
            store_dq(dq, it - 1, 0);
            wgmma_fence();
            issue_product(dpt, v4, o4, it);
            wgmma_commit();
        } else {
            issue_sdp(st, dpt, it);
        }
        u32 pa[BM / 16][4], sa[BM / 16][4];
        p_then_ds(st, dpt, it, pa, sa, nullptr);
        // dS^T stores before the next tile's dQ (async proxy) reads them. (Between the commit
        // and the wait below, this fence crashes ptxas 12.9.)
        fence_async_smem();
        wgmma_fence();
        issue_grad(dk, sa, q4, it);
        wgmma_commit();
        wgmma_wait<0>();      // dV and dK read this tile's stage and the A fragments
        pin(dk);
        pin(dv);
        pin(pa);
        pin(sa);
    };
    if (DEFER && total > 0) defer_tile(false, 0);
    for (int it = 1; it < total && DEFER; ++it) defer_tile(true, it);
    if (DEFER && total > 0) {   // the last tile's dQ
        __syncthreads();
        float dq[DQ_N / 2];
        issue_dq(dq, 0, total - 1);
        wgmma_wait<0>();
        pin(dq);
        store_dq(dq, total - 1, 0);
    }
    for (int it = 0; it < total && !REORDER && !DEFER; ++it) {
        // Every warpgroup is done with tile it-1 (its wgmmas were waited for), so the other
        // stage and the dS^T tile may be refilled: one barrier per tile here, one for dS^T below.
        begin_tile(it);
        float st[BM / 2], dpt[BM / 2];
        u32 pa[BM / 16][4], sa[BM / 16][4];
        if constexpr (ROLE) {
            role_tile(st, dpt, it, pa, sa);
        } else if constexpr (OVERLAP) {
            RowVals nl;
            if constexpr (EARLY_ROWS) nl = tile_cols(it, false);
            issue_sdp(st, dpt, it);
            p_then_ds(st, dpt, it, pa, sa, EARLY_ROWS ? &nl : nullptr);
            wgmma_fence();
            issue_grad(dk, sa, q4, it);
            wgmma_commit();
        } else {
            issue_sdp(st, dpt, it);
            wgmma_wait<0>();
            pin(st);
            pin(dpt);
            to_p(st, nullptr, it, pa);
            to_ds(st, dpt, nullptr, it, sa);
            wgmma_fence();
            issue_grad(dv, pa, o4, it);
            issue_grad(dk, sa, q4, it);
            wgmma_commit();   // runs while the warpgroups meet at the barrier
        }
        fence_async_smem();
        __syncthreads();    // all of dS^T is in smem
        if (ROLE && wg == 0) issue_dk_from_smem(it);
#pragma unroll
        for (int part = 0; part < DQ_PARTS; ++part) {
            float dq[DQ_N / 2];
            issue_dq(dq, part, it);
            wgmma_wait<0>();
            pin(dq);
            pin(dk);
            pin(dv);
            pin(pa);
            pin(sa);
            store_dq(dq, it, part);
        }
    }
    cp_async_wait<0>();      // no copy outlives the CTA (total == 0 skips every wait above)
    wgmma_wait<0>();
    pin(dk);
    pin(dv);
    if (DQ == 2 || DQ == 3 ? lane == 0 : (BULK_DQ && lane < 16)) bulk_wait();   // smem must outlive the copy engine's reads

    // dkhat = scale * dK (fp32: the normalisation backward follows), dV in T.
    float* dkb = dk_out + kv_off;
    T* dvb = dv_out + kv_off;
    const int k0 = kwg * 64 + warp * 16 + g, k1 = k0 + 8;
#pragma unroll
    for (int j = 0; j < DO / 8; ++j) {
        const int col = col_base + j * 8 + 2 * t;
        if (n0 + k0 < J) {
            *reinterpret_cast<float2*>(dkb + (long long)k0 * D + col) = make_float2(dk[4 * j] * scale, dk[4 * j + 1] * scale);
            *reinterpret_cast<u32*>(dvb + (long long)k0 * D + col) = Pack<T>::from_floats(dv[4 * j], dv[4 * j + 1]);
        }
        if (n0 + k1 < J) {
            *reinterpret_cast<float2*>(dkb + (long long)k1 * D + col) = make_float2(dk[4 * j + 2] * scale, dk[4 * j + 3] * scale);
            *reinterpret_cast<u32*>(dvb + (long long)k1 * D + col) = Pack<T>::from_floats(dv[4 * j + 2], dv[4 * j + 3]);
        }
    }
}
