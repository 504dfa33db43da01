"""Where the run-to-run variation of a long forward cell comes from: the same cell timed in
several rounds within one process, each round on freshly allocated inputs (the earlier ones kept
alive, so every round gets new addresses), with the benchmark's own timer (median of repeated
calls, L2 flushed before each). Run it in several processes: a spread between processes that
the rounds of one process do not show points at the process (its allocations, its context),
one within a process at the inputs' placement or the machine's state.

    python3 benchmarks/variance_probe.py --dtype bf16 --d 128 --n 16384 --rounds 4
"""
from __future__ import annotations

import argparse
import os

import torch

import cupy_cosine_attn as ca
from cupy_cosine_attn.bench import Timer, forward_flops


def cell_parser(doc):
    """Arguments naming one benchmark cell (the CLI's default shapes: b·n tokens, 2048/d heads),
    shared with sustained_probe.py."""
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"])
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--causal", action="store_true")
    return ap


def cell_shape(a):
    """(torch dtype, batch, heads) of the parsed cell."""
    return torch.float16 if a.dtype == "fp16" else torch.bfloat16, a.tokens // a.n, 2048 // a.d


def main():
    ap = cell_parser(__doc__)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    dtype, b, h = cell_shape(a)
    flops = forward_flops(b, h, a.n, a.n, a.d, a.causal)
    timer = Timer("cuda:0")
    kept = []
    for r in range(a.rounds):
        q, k, v = (torch.randn(b, h, a.n, a.d, device="cuda", dtype=dtype) for _ in range(3))
        kept.append((q, k, v))
        ms, reps = timer.median_ms(lambda: ca.flash_cosine_sim_attention(q, k, v, causal=a.causal),
                                   a.repeats, 2, 10.0)
        print(f"pid {os.getpid()} round {r} {a.dtype} d{a.d} n{a.n}{' causal' if a.causal else ''} "
              f"q@{q.data_ptr() % (1 << 40):#x} k@{k.data_ptr() % (1 << 40):#x}: "
              f"{ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s ({reps} calls)", flush=True)


if __name__ == "__main__":
    main()
