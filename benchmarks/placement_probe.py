"""Does the forward's speed depend on where its inputs lie in memory? The Hopper forward kernel
alone (gpu_launch.launch_forward, fp16, already-normalised q and k), timed with CUDA events and
L2 flushed before each call, on K and V placed in one buffer at chosen byte distances: right
after one another, with small and large gaps, V before K. A spread between placements of the
same data means the memory system (DRAM channels, L2 slices), not the kernel, sets part of the
run-to-run variation of the benchmark's long cells, whose inputs land wherever the allocator
puts them.

    python3 benchmarks/placement_probe.py [--n 16384] [--d 128]
"""
from __future__ import annotations

import argparse
import statistics

import cupy as cp
import numpy as np

from cupy_cosine_attn import gpu_launch
from cupy_cosine_attn.problem import make_problem

GAPS = [("k then v, adjacent", 0, False), ("gap 4 KiB", 4096, False), ("gap 64 KiB", 65536, False),
        ("gap 1 MiB", 1 << 20, False), ("gap 2 MiB + 4 KiB", (2 << 20) + 4096, False),
        ("gap 32 MiB", 32 << 20, False), ("gap 160 MiB", 160 << 20, False),
        ("v then k, adjacent", 0, True), ("v then k, gap 1 MiB", 1 << 20, True)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    b, h, n, d = a.tokens // a.n, 2048 // a.d, a.n, a.d
    elems = b * h * n * d
    nbytes = elems * 2
    rng = cp.random.default_rng(0)

    def normalised(shape):
        x = rng.standard_normal(shape, dtype=cp.float32)
        return (x / cp.linalg.norm(x, axis=-1, keepdims=True)).astype(cp.float16)

    q = normalised((b, h, n, d))
    kv = normalised((2, b, h, n, d))
    out = cp.empty((b, h, n, d), cp.float16)
    lse = cp.empty((b, h, n), cp.float32)
    flush = cp.empty(256 << 20, cp.uint8)
    big = cp.empty(2 * nbytes + max(g for _, g, _ in GAPS) + 4096, cp.uint8)
    flops = 4 * d * h * b * n * n
    for rnd in range(a.rounds):
        for label, gap, swap in GAPS:
            first, second = big[:nbytes], big[nbytes + gap:2 * nbytes + gap]
            k_mem, v_mem = (second, first) if swap else (first, second)
            k = k_mem.view(cp.float16).reshape(b, h, n, d)
            v = v_mem.view(cp.float16).reshape(b, h, n, d)
            k[...] = kv[0]
            v[...] = kv[1]
            problem = make_problem(q, k, v)
            shift = gpu_launch.choose_shift(problem, q, k)
            call = lambda: gpu_launch.launch_forward(problem, q, k, v, out, lse, shift)  # noqa: E731
            call()
            times = []
            for _ in range(a.repeats):
                flush.fill(0)
                start, end = cp.cuda.Event(), cp.cuda.Event()
                start.record()
                call()
                end.record()
                end.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, end))
            ms = statistics.median(times)
            print(f"round {rnd} fp16 d{d} n{n} {label:22s} k@+{(k.data.ptr - big.data.ptr) >> 10:>7} KiB "
                  f"v@+{(v.data.ptr - big.data.ptr) >> 10:>7} KiB: {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s "
                  f"(min {min(times):.3f}, max {max(times):.3f})", flush=True)
    assert np.isfinite(float(out[0, 0, 0, 0]))


if __name__ == "__main__":
    main()
