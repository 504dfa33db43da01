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

}  // namespace cattn
