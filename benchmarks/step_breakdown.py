"""Where the time of one forward + backward goes, kernel by kernel (torch profiler, CUDA time).

    python benchmarks/step_breakdown.py --d 64 --n 2048 --causal [--dtype float16]

Same problem sizes as the benchmark CLI (32768 tokens, 2048 / d heads). Prints each kernel's
share of the GPU time of `--reps` steps. A diagnostic, not a benchmark: the CLI is the record.
"""
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cupy_cosine_attn import flash_cosine_sim_attention  # noqa: E402
from profile_step import step_inputs, step_parser  # noqa: E402


def main():
    ap = step_parser(2048)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    q, k, v, go = step_inputs(a)
    b, h = q.shape[0], q.shape[1]

    def step():      # autograd.grad: no accumulation into .grad (not part of the step's cost)
        torch.autograd.grad(flash_cosine_sim_attention(q, k, v, causal=a.causal), (q, k, v), go)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(a.reps):
            step()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t > 0 and ev.count:
            rows.append((t / a.reps, ev.count // a.reps, ev.key))
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows if not r[2].startswith("cuda"))
    print(f"# {a.dtype} d{a.d} b{b} h{h} n{a.n} {'causal' if a.causal else 'non-causal'}: "
          f"per step (forward + backward), microseconds of GPU time")
    for t, c, name in rows:
        print(f"{t:10.1f} us {100 * t / total:5.1f}%  x{c:<3d} {name[:110]}")
    print(f"{total:10.1f} us total")


if __name__ == "__main__":
    main()
