"""Where the time of the Hopper kernels goes, without hardware counters: copies of the default
forward and backward built with stages left out (-DCATTN_DIAG bits, kernels/cosine_*_sm90.cu;
their results are wrong) are timed kernel-only beside the full kernel, on the probe's shapes.

    forward bits:  2 no exponentials (p = the logit), 4 no P V products, 8 no Q K^T products,
                   16 no CTA barrier per key tile
    backward bits: 1 no dQ (products and reduce-add), 2 no exponentials, 4 no dV/dK products,
                   8 no S^T/dP^T products, 16 no dS^T stores to shared memory

    python benchmarks/phase_probe.py --out $OUT --d 128 --n 8192 --fwd 0,2,4,8,16 --bwd 0,1,2,4,8,16
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import cupy as cp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sm90_probe as probe  # noqa: E402  (compiles specs with their options, own cache)
from cupy_cosine_attn import hopper_launch  # noqa: E402
from cupy_cosine_attn.gpu_launch import CTYPE  # noqa: E402

DIAG = [0]


def with_diag(spec, bits):
    return dataclasses.replace(spec, options=tuple(spec.options) + (f"-DCATTN_DIAG={bits}",))


hopper_launch.get_function = lambda spec: probe.own_get_function(with_diag(spec, DIAG[0]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--fwd", default="0,2,4,8,16", help="forward DIAG values to time")
    ap.add_argument("--bwd", default="0,1,2,4,8,16", help="backward DIAG values to time")
    ap.add_argument("--precompile", type=int, default=16)
    a = ap.parse_args()
    fwd_bits = [int(x) for x in a.fwd.split(",") if x]
    bwd_bits = [int(x) for x in a.bwd.split(",") if x]
    ct = CTYPE[a.dtype]
    specs = ([with_diag(hopper_launch.forward_spec(ct, a.d), b) for b in fwd_bits]
             + [with_diag(hopper_launch.backward_spec(ct, a.d), b) for b in bwd_bits])
    if a.precompile:
        probe.precompile(specs, a.precompile)
    b, h, n, d = max(1, 32768 // a.n), 2048 // a.d, a.n, a.d
    q, k, v, _, _ = probe.make_case(a.dtype, b, h, h, n, n, d, a.causal, False, False, 7)
    dout = probe.raw(cp.random.RandomState(1).standard_normal(q.shape, dtype=cp.float32), a.dtype)
    DIAG[0] = 0
    _, lse = probe.run("sm90", a.dtype, q, k, v, None, None, a.causal, 8.0, wgs=None)
    delta = cp.zeros(lse.shape, dtype=cp.float32)
    flops = 4 * b * h * n * n * d * (0.5 if a.causal else 1.0)
    rows = []
    for kind, bits_list in (("fwd", fwd_bits), ("bwd", bwd_bits)):
        base = None
        for bits in bits_list:
            DIAG[0] = bits
            if kind == "fwd":
                sec = probe.timeit(lambda: probe.run("sm90", a.dtype, q, k, v, None, None, a.causal, 8.0, wgs=None))
                fl = flops
            else:
                sec = probe.timeit(lambda: probe.run_bwd("sm90", a.dtype, q, k, v, dout, lse, delta, None, None,
                                                         a.causal, 8.0), 5)
                fl = 2.5 * flops
            base = sec if bits == 0 else base
            row = dict(kind=kind, bits=bits, us=sec * 1e6, tflops_equiv=fl / sec / 1e12,
                       saved_pct=None if base is None else 100 * (1 - sec / base))
            rows.append(row)
            probe.log(f"{kind} diag={bits:2d} {sec * 1e6:9.1f} us  {fl / sec / 1e12:6.1f} TFLOP/s-equiv"
                      + ("" if base is None or bits == 0 else f"  time saved {row['saved_pct']:5.1f}%"))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"d{a.d}_n{a.n}_{a.dtype}{'_causal' if a.causal else ''}"
    (out / f"phase_probe_{tag}.json").write_text(json.dumps(dict(args=vars(a), rows=rows), indent=1))
    (out / f"phase_probe_{tag}.log").write_text("\n".join(probe.LOG) + "\n")


if __name__ == "__main__":
    main()
