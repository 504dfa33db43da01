// wgmma.mma_async m64nNk16 with fp32 accumulators (sm_90a), one struct per (N, type):
//   Wgmma<N, T>::ss: A and B from shared memory (descriptors), TRANS_A/TRANS_B = 1 for an
//                    operand stored MN-major;
//   Wgmma<N, T>::rs: A from registers (4 x b16x2 per thread, the mma.sync A-fragment layout), B from
//             shared memory, TRANS_B = 1 when B is stored MN-major.
// scale_d = 0 overwrites the accumulators (first k-step), 1 accumulates.
// Inline asm numbers its operands, the N/2 accumulators first, so each shape has its own strings
// (generated into wgmma_ops.cuh by gen_wgmma.py): the accumulator list CATTN_WGMMA_ACC_N, their
// constraints CATTN_WGMMA_OUT_N, and the numbers of the predicate operand (_PRED_N) and of the
// operands after the accumulators (_TAIL_N) in the ss and rs forms. CATTN_WGMMA_DEFINE(N, T, PTX)
// puts them together into Wgmma<N, T>.
#pragma once
#include "tile.cuh"

namespace cattn {

template <int N, typename T> struct Wgmma;

}  // namespace cattn

#define CATTN_WGMMA_ASM(N, PTX, FORM)                                                         \
    "{\n.reg .pred p;\nsetp.ne.b32 p, " CATTN_WGMMA_##FORM##_PRED_##N                          \
    "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX "." PTX " "                          \
    CATTN_WGMMA_ACC_##N CATTN_WGMMA_##FORM##_TAIL_##N

#define CATTN_WGMMA_DEFINE(N, CTYPE, PTX)                                                     \
    template <> struct Wgmma<N, CTYPE> {                                                      \
        template <int TRANS_A = 0, int TRANS_B = 0>                                           \
        static __device__ __forceinline__ void ss(float (&d)[N / 2], unsigned long long da,   \
                                                  unsigned long long db, int scale_d) {       \
            asm volatile(CATTN_WGMMA_ASM(N, PTX, SS)                                          \
                         : CATTN_WGMMA_OUT_##N                                                \
                         : "l"(da), "l"(db), "r"(scale_d), "n"(TRANS_A), "n"(TRANS_B));       \
        }                                                                                     \
        template <int TRANS_B>                                                                \
        static __device__ __forceinline__ void rs(float (&d)[N / 2], const u32 (&a)[4],       \
                                                  unsigned long long db, int scale_d) {       \
            asm volatile(CATTN_WGMMA_ASM(N, PTX, RS)                                          \
                         : CATTN_WGMMA_OUT_##N                                                \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d), \
                           "n"(TRANS_B));                                                     \
        }                                                                                     \
    };
