// Light pre- and post-passes around the attention kernels, one warp per row:
//   l2norm_rows      xhat = x * r per group (r = 1/||x_g||, 0 for zero groups), keeps r
//   l2norm_backward  dx = r * (dxhat - xhat <xhat, dxhat>) per group
//   row_dot          D = <dout, out> per row (backward)
#include "tile.cuh"
using namespace cattn;

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
