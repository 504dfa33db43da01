// Light pre- and post-passes around the attention kernels, one warp per row:
//   l2norm_rows      xhat = x * r per group (r = 1/||x_g||, 0 for zero groups), keeps r
//   l2norm_backward  dx = r * (dxhat - xhat <xhat, dxhat>) per group
//   row_dot          D = <dout, out> per row (backward)
//   pack_row_stats   lse (log2 units) and D per tile of query rows, padded (Hopper backward)
// The *_v8 kernels do the same with 8 consecutive elements per thread (16-byte loads of a 2-byte
// type) and `tpr` threads per row: one warp per row at d = 64 reads 4 bytes per lane, a third of
// the bandwidth these memory-bound passes need. The launch layer picks them where they apply.
#include "tile.cuh"
using namespace cattn;

// 8 elements at p (16-byte aligned) as floats, and back.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
    constexpr int W = sizeof(T) / 2;                  // 16-byte words: 1 for 2-byte types, 2 for float
    uint4 u[W];
#pragma unroll
    for (int w = 0; w < W; ++w) u[w] = reinterpret_cast<const uint4*>(p)[w];
    const T* e = reinterpret_cast<const T*>(u);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = to_float(e[k]);
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&f)[8]) {
    constexpr int W = sizeof(T) / 2;
    uint4 u[W];
    T* e = reinterpret_cast<T*>(u);
#pragma unroll
    for (int k = 0; k < 8; ++k) e[k] = from_float<T>(f[k]);
#pragma unroll
    for (int w = 0; w < W; ++w) reinterpret_cast<uint4*>(p)[w] = u[w];
}

// Where a thread of the *_v8 kernels works: `tpr` threads per row (a power of two, tpr * 8 >= d).
// Threads past the last row or column load zeros and store nothing, but still take part in the
// shuffles (all 32 lanes of every warp are present).
struct RowSlot {
    long long row;
    int col;          // first of this thread's 8 elements
    bool live;
    __device__ RowSlot(long long rows, int d, int tpr) {
        int rows_per_block = blockDim.x / tpr;
        row = (long long)blockIdx.x * rows_per_block + threadIdx.x / tpr;
        col = (threadIdx.x % tpr) * 8;
        live = row < rows && col < d;
    }
};

// Sum over aligned runs of `seg` lanes (a power of two): a group's sum when each group is seg
// threads wide, the row's sum when seg = tpr.
__device__ __forceinline__ float seg_sum(float s, int seg) {
    for (int o = 1; o < seg; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    return s;
}

// This thread's 8 elements of row at.row of a and of b (zeros where it is idle), and their dot
// product over the row's (or group's) `seg` lanes.
template <typename A, typename B>
__device__ __forceinline__ float load_pair_dot(const RowSlot& at, const A* a, const B* b, int d, int seg,
                                               float (&x)[8], float (&y)[8]) {
    if (at.live) {
        load8(a + at.row * d + at.col, x);
        load8(b + at.row * d + at.col, y);
    }
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) s += x[k] * y[k];
    return seg_sum(s, seg);
}

template <typename T>
__global__ void l2norm_rows_v8(const T* __restrict__ x, T* __restrict__ xhat, float* __restrict__ rnorm,
                               long long rows, int d, int groups, int tpr, int seg) {
    RowSlot at(rows, d, tpr);
    float v[8] = {};
    if (at.live) load8(x + at.row * d + at.col, v);
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
    ss = seg_sum(ss, seg);
    float norm = sqrtf(ss);
    float r = norm > 1e-12f ? 1.0f / norm : 0.f;
    if (!at.live) return;
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] *= r;
    store8(xhat + at.row * d + at.col, v);
    int g = at.col * groups / d;
    if (at.col == g * (d / groups)) rnorm[at.row * groups + g] = r;    // first thread of its group
}

template <typename T>
__global__ void l2norm_backward_v8(const float* __restrict__ dxhat, const T* __restrict__ xhat,
                                   const float* __restrict__ rnorm, T* __restrict__ dx,
                                   long long rows, int d, int groups, int tpr, int seg) {
    RowSlot at(rows, d, tpr);
    float dr[8] = {}, xr[8] = {};
    const float dot = load_pair_dot(at, dxhat, xhat, d, seg, dr, xr);
    if (!at.live) return;
    float r = rnorm[at.row * groups + at.col * groups / d];
#pragma unroll
    for (int k = 0; k < 8; ++k) dr[k] = r * (dr[k] - xr[k] * dot);
    store8(dx + at.row * d + at.col, dr);
}

template <typename T>
__global__ void row_dot_v8(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                           long long rows, int d, int tpr) {
    RowSlot at(rows, d, tpr);
    float x[8] = {}, y[8] = {};
    const float s = load_pair_dot(at, a, b, d, tpr, x, y);
    if (at.live && at.col == 0) out[at.row] = s;
}

template <typename T>
__global__ void l2norm_rows(const T* __restrict__ x, T* __restrict__ xhat, float* __restrict__ rnorm,
                            long long rows, int d, int groups) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T* xr = x + row * d;
    T* outr = xhat + row * d;
    int gs = d / groups;
    for (int g = 0; g < groups; ++g) {
        float ss = 0.f;
        for (int e = g * gs + lane; e < (g + 1) * gs; e += 32) {
            float v = to_float(xr[e]);
            ss += v * v;
        }
        ss = warp_sum(ss);
        float norm = sqrtf(ss);
        float r = norm > 1e-12f ? 1.0f / norm : 0.f;
        for (int e = g * gs + lane; e < (g + 1) * gs; e += 32) outr[e] = from_float<T>(to_float(xr[e]) * r);
        if (lane == 0) rnorm[row * groups + g] = r;
    }
}

// dxhat is fp32; xhat in the input type; dx written in the input type.
template <typename T>
__global__ void l2norm_backward(const float* __restrict__ dxhat, const T* __restrict__ xhat,
                                const float* __restrict__ rnorm, T* __restrict__ dx,
                                long long rows, int d, int groups) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    int gs = d / groups;
    const float* dr = dxhat + row * d;
    const T* xr = xhat + row * d;
    T* out = dx + row * d;
    for (int g = 0; g < groups; ++g) {
        float dot = 0.f;
        for (int e = g * gs + lane; e < (g + 1) * gs; e += 32) dot += to_float(xr[e]) * dr[e];
        dot = warp_sum(dot);
        float r = rnorm[row * groups + g];
        for (int e = g * gs + lane; e < (g + 1) * gs; e += 32)
            out[e] = from_float<T>(r * (dr[e] - to_float(xr[e]) * dot));
    }
}

// fp32 -> T with an optional scale (dq, dk, dv of unnormalised paths).
template <typename T>
__global__ void scale_cast(const float* __restrict__ x, T* __restrict__ y, long long n, float s) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; idx < n; idx += (long long)gridDim.x * blockDim.x) y[idx] = from_float<T>(x[idx] * s);
}

template <typename T>
__global__ void cast_to_float(const T* __restrict__ x, float* __restrict__ y, long long n) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; idx < n; idx += (long long)gridDim.x * blockDim.x) y[idx] = to_float(x[idx]);
}

template <typename T>
__global__ void row_dot(const T* __restrict__ a, const T* __restrict__ b, float* __restrict__ out,
                        long long rows, int d) {
    long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float s = 0.f;
    for (int e = lane; e < d; e += 32) s += to_float(a[row * d + e]) * to_float(b[row * d + e]);
    s = warp_sum(s);
    if (lane == 0) out[row] = s;
}

// The Hopper backward's row statistics: for each (batch·head, tile of `bm` query rows), bm values
// of lse·log2(e) (+inf for a row that saw no key) and then bm of delta, the rows past i padded
// with +inf and 0 (probability 0, no gradient), so that a tile's are one aligned block the
// kernel brings in with a single bulk copy. One thread per padded row.
__global__ void pack_row_stats(const float* __restrict__ lse, const float* __restrict__ delta,
                               float* __restrict__ stats, long long heads, int i, int tiles, int bm) {
    const long long rows = heads * tiles * bm;
    for (long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x; idx < rows;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long head = idx / ((long long)tiles * bm);
        const int r = (int)(idx - head * tiles * bm);
        float* tile = stats + (head * tiles + r / bm) * 2 * bm + r % bm;
        const bool real = r < i;
        tile[0] = real ? lse_log2(lse[head * i + r]) : INFINITY;
        tile[bm] = real ? delta[head * i + r] : 0.f;
    }
}
