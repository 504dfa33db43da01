// What the forward and backward kernels agree on: which keys a query row sees and the bias term.
#pragma once
#include "tile.cuh"

namespace cattn {

// Key `col` is visible to query `row`: inside the sequence, kept by the mask (True = keep), and
// with causal, col <= row + (J - I) (bottom-right alignment).
__device__ __forceinline__ bool key_visible(const unsigned char* __restrict__ mask_b, int row, int col,
                                            int I, int J, int causal) {
    if (col >= J || row >= I) return false;
    if (causal && col > row + (J - I)) return false;
    return mask_b == nullptr || mask_b[col] != 0;
}

// Query-row tile of a forward CTA on a flat grid (no 65535 limit on batch*heads): m0 is its first
// row, bh its (batch, head). Row tiles are taken last to first, so the heaviest causal ones start
// first.
__device__ __forceinline__ void row_tile_heavy_first(int rows, int I, int& m0, int& bh) {
    const int n_row_tiles = (I + rows - 1) / rows;
    m0 = (n_row_tiles - 1 - (int)(blockIdx.x % n_row_tiles)) * rows;
    bh = blockIdx.x / n_row_tiles;
}

// What (batch, query head) bh reads: its batch and head, the k/v head it shares with its group
// (grouped and multi-query heads), that head's K and V rows (J x D), and its key-mask row.
template <typename T>
struct HeadSlices {
    int bi, hi, hki;
    const T* kb;
    const T* vb;
    const unsigned char* mask_b;
    __device__ __forceinline__ HeadSlices(int bh, int H, int HK, int J, int D, const T* k,
                                          const T* v, const unsigned char* mask)
        : bi(bh / H), hi(bh % H), hki(hi / (H / HK)) {
        const long long kv_off = (long long)(bi * HK + hki) * J * D;
        kb = k + kv_off;
        vb = v + kv_off;
        mask_b = mask ? mask + (long long)bi * J : nullptr;
    }
};

// Additive bias in log2 units; strides in elements (0 on broadcast dims), unit column stride.
template <typename T>
struct BiasView {
    const T* __restrict__ p;
    long long sb, sh, si;
    __device__ __forceinline__ float log2_at(int bi, int hi, int row, int col) const {
        return p == nullptr ? 0.f : to_float(p[bi * sb + hi * sh + (long long)row * si + col]) * LOG2E;
    }
};

// First key column of the next tile no row of [m0, m0 + rows) can see (causal), or J.
__device__ __forceinline__ int key_end(int m0, int rows, int I, int J, int causal) {
    return causal ? max(0, min(J, m0 + rows + J - I)) : J;
}

// Forward epilogue of one thread's accumulator pair (columns col, col + 1 of a row).
template <typename T>
__device__ __forceinline__ void store_out_pair(T* out_bh, int row, int I, int D, int col, float a,
                                               float b) {
    if (row < I && col < D)
        *reinterpret_cast<u32*>(out_bh + (long long)row * D + col) = Pack<T>::from_floats(a, b);
}

// lse of a row from its probability sum l and the shift it was taken against (log2 units).
__device__ __forceinline__ void store_lse(float* lse_bh, int row, int I, float l, float base2) {
    if (row < I) lse_bh[row] = l > 0.f ? (base2 + log2f(l)) * LN2 : -INFINITY;
}

// Bias gradient sink: dS goes to `direct_p` (type T, written once per element) when set, else is
// atomically added to the fp32 buffer `acc_p` (broadcast bias dims).
template <typename T>
struct BiasGrad {
    T* __restrict__ direct_p;
    float* __restrict__ acc_p;
    long long sb, sh, si;
    __device__ __forceinline__ bool active() const { return direct_p != nullptr || acc_p != nullptr; }
    __device__ __forceinline__ void put(int bi, int hi, int row, int col, float ds) const {
        const long long off = bi * sb + hi * sh + (long long)row * si + col;
        if (direct_p) direct_p[off] = from_float<T>(ds);
        else atomicAdd(acc_p + off, ds);
    }
};

}  // namespace cattn
