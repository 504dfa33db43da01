"""Ratios of our TFLOP/s to each peer's, per case, from a JSON written by the benchmark CLI.

    python benchmarks/compare_peers.py results/h200_v3_grid.json [--peers sdpa-flash,sdpa-cudnn]

Prints one line per (dtype, d, n, causal, mode) with our rate and ours/peer for each peer, and
marks the cases below 1.0x of the first peer.
"""
import argparse
import collections
import json

OURS = "cupy-cosine-attn"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--peers", default="sdpa-flash,sdpa-cudnn")
    a = ap.parse_args()
    peers = a.peers.split(",")
    rows = collections.defaultdict(dict)
    for r in json.load(open(a.json))["results"]:
        if r.get("tflops"):
            key = (r["dtype"], r["d"], r["i"], "causal" if r["causal"] else "full", r["mode"])
            rows[key][r["contender"]] = r["tflops"]
    print("dtype     d    n      mask    mode    ours  " + "  ".join(f"{p:>18s}" for p in peers))
    for key, rates in rows.items():
        if OURS not in rates:
            continue
        ours = rates[OURS]
        cells = [f"{rates[p]:6.0f} -> {ours / rates[p]:4.2f}x" if p in rates else f"{'-':>18s}"
                 for p in peers]
        below = peers[0] in rates and ours < rates[peers[0]]
        print(f"{key[0]:9s} {key[1]:<4d} {key[2]:<6d} {key[3]:7s} {key[4]:7s} {ours:5.0f}  "
              + "  ".join(f"{c:>18s}" for c in cells) + ("   < " + peers[0] if below else ""))


if __name__ == "__main__":
    main()
