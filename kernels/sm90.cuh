// Hopper (sm_90a) tile helpers: 128-byte-swizzled shared-memory tiles filled by cp.async, the
// wgmma matrix descriptors that read them, and the ordering fences wgmma needs.
//
// Tile layout ("sw128"): a ROWS x D tile of 16-bit elements is stored as D/64 column slabs of
// ROWS x 128 bytes; in each slab, row r's 16-byte chunk c sits at chunk position c ^ (r % 8).
// That is the canonical 128B-swizzle layout for both K-major operands (rows = M or N, columns =
// K) and MN-major ones (rows = K, columns = N): one layout serves QK^T (K as B, K-major) and PV
// (V as B, MN-major) without any transpose. Slabs must start on 1024-byte boundaries.
#pragma once
#include "wgmma_ops.cuh"

#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "the sm_90a kernels need -arch=sm_90a (wgmma)"
#endif

namespace cattn {

// Byte offset of element (r, c) in a sw128 tile with ROWS rows.
template <int ROWS>
__device__ __forceinline__ int sw128_offset(int r, int c) {
    return (c / 64) * ROWS * 128 + r * 128 + ((((c % 64) / 8) ^ (r % 8)) * 16) + (c % 8) * 2;
}

// Load a ROWS x D tile of a row-major (n, D) matrix into a sw128 tile, zero-filling rows
// >= n_valid. Consecutive threads take consecutive 16-byte chunks of a row (coalesced).
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_sw128(T* smem, const T* gmem, int n_valid) {
    constexpr int CHUNKS = D / 8;
    unsigned char* base = reinterpret_cast<unsigned char*>(smem);
#pragma unroll
    for (int c = threadIdx.x % THREADS; c < ROWS * CHUNKS; c += THREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        const bool ok = r < n_valid;
        cp_async_16(base + sw128_offset<ROWS>(r, col), ok ? gmem + (long long)r * D + col : gmem,
                    ok ? 16 : 0);
    }
}

// wgmma shared-memory matrix descriptor, 128-byte swizzle. For K-major operands `lbo` is unused
// and `sbo` is the stride between 8-row groups (1024 in a sw128 tile); for MN-major ones `lbo` is
// the stride between 64-element column slabs and `sbo` the stride between 8-row groups of K.
__device__ __forceinline__ unsigned long long sw128_desc(const void* smem, int lbo, int sbo) {
    const unsigned long long addr = smem_addr(smem);
    return ((addr & 0x3FFFF) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) |
           ((unsigned long long)((sbo >> 4) & 0x3FFF) << 32) | (1ull << 62);
}

// The same descriptor for a tile whose shared-memory address >> 4 (`base4`, computed once) is
// known: `bytes` on from there (a multiple of 16). The address field stays below 2^14 (shared
// memory is under 256 KiB), so the constant fields go in with the same add: one IADD per wgmma
// operand in the unrolled loops instead of a mask, shift and or.
template <int LBO, int SBO>
__device__ __forceinline__ unsigned long long sw128_desc_at(u32 base4, int bytes) {
    const u32 lo = base4 + (u32)(bytes >> 4) + ((u32)((LBO >> 4) & 0x3FFF) << 16);
    const u32 hi = (u32)((SBO >> 4) & 0x3FFF) | (1u << 30);
    return ((unsigned long long)hi << 32) | lo;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
// Shared memory written through the generic proxy (cp.async, st.shared) and read next by wgmma
// (async proxy) needs this fence in the writing threads before the barrier.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Bulk reduce-add of `bytes` (multiple of 16, both addresses 16-byte aligned) fp32 values from
// shared to global memory, done by the copy engine; tracked per issuing thread in bulk groups.
__device__ __forceinline__ void bulk_reduce_add_f32(float* gdst, const float* ssrc, int bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
                 :: "l"(gdst), "r"(smem_addr(ssrc)), "r"(bytes) : "memory");
}
// dst[0..1] += (a, b) in global memory as one vector reduction (sm_90; dst 8-byte aligned): the
// L2 adds it, the thread does not wait.
__device__ __forceinline__ void red_add_f32x2(float* dst, float a, float b) {
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(dst), "f"(a), "f"(b) : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The smem sources of this thread's bulk groups may be overwritten after this.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
__device__ __forceinline__ void bulk_wait() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// TMA (the bulk tensor copy engine). A TmaMap is the driver's 128-byte tensor map, encoded on
// the host (cupy_cosine_attn/tma.py) and passed by value as a `const __grid_constant__` kernel
// parameter, whose address the copy instruction takes.
struct __align__(64) TmaMap { unsigned long long words[16]; };

// mbarrier (shared-memory transaction barrier): one arrival (the thread that issues the copies)
// plus the bytes the copies deliver complete a phase; waiters name the phase by its parity.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, int arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_addr(bar)), "r"(arrivals) : "memory");
}
// After the inits, before the barrier that publishes them: makes them visible to the copy engine.
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(unsigned long long* bar, int bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                 :: "r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// CATTN_MBAR_TIMEOUT (tuning builds only): trap after about 2^32 clocks instead of hanging when
// a phase never completes.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, int parity) {
    u32 done;
#ifdef CATTN_MBAR_TIMEOUT
    const long long start = clock64();
#endif
    do {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                     " selp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_addr(bar)), "r"(parity) : "memory");
#ifdef CATTN_MBAR_TIMEOUT
        if (!done && clock64() - start > (1ll << 32)) __trap();
#endif
    } while (!done);
}
// Copy the box at element coordinates (c0 innermost, c1, c2) of `map`'s tensor into shared memory
// at `dst` (1024-byte aligned for the 128-byte swizzle); completion is counted on `bar` in bytes.
// Rows outside the tensor arrive as zeros (and still count).
__device__ __forceinline__ void tma_load_3d(void* dst, const TmaMap* map, int c0, int c1, int c2,
                                            unsigned long long* bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];\n"
                 :: "r"(smem_addr(dst)), "l"(reinterpret_cast<unsigned long long>(map)),
                    "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar)) : "memory");
}

// Copy `bytes` (a multiple of 16; both addresses 16-byte aligned) from global to shared memory
// by the copy engine, completion counted on `bar` in bytes.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, int bytes, unsigned long long* bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(bytes), "r"(smem_addr(bar)) : "memory");
}

// dst (global, through a tensor map) += a box of fp32 from smem, by the copy engine (a bulk
// group: bulk_commit / bulk_wait_read as for bulk_reduce_add_f32); box rows past the tensor's
// end are not written.
__device__ __forceinline__ void tma_reduce_add_3d(const TmaMap* map, const void* src, int c0, int c1, int c2) {
    asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.tile.bulk_group"
                 " [%0, {%1, %2, %3}], [%4];\n"
                 :: "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2),
                    "r"(smem_addr(src)) : "memory");
}

// Register budget of this warpgroup from here on (sm_90a; every thread of the warpgroup runs it):
// a producer gives registers back, the consumers take them. Needs a register cap at kernel entry
// (__launch_bounds__(threads, 1)) and one role per branch.
template <int N> __device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(N));
}
template <int N> __device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(N));
}
// Named barrier `id` (1..15) over `count` threads (a multiple of 32), for a subset of the CTA.
__device__ __forceinline__ void named_barrier_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}

// Arrive at named barrier `id` without waiting (the other side of a named_barrier_sync).
__device__ __forceinline__ void named_barrier_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" :: "r"(id), "r"(count) : "memory");
}

// Pin registers at this point of the program: the compiler may not move their uses across it.
// wgmma reads and writes registers asynchronously, so after a wgmma_wait the accumulators (and
// the A fragments still read by an earlier wgmma) are pinned before ordinary code touches them.
template <int N> __device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i]) :: "memory");
}
template <int N> __device__ __forceinline__ void pin(u32 (&r)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(r[i][e]) :: "memory");
}

}  // namespace cattn
