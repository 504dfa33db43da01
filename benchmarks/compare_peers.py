"""Ratios of our TFLOP/s to each peer's, per case, from a JSON written by the benchmark CLI.

    python benchmarks/compare_peers.py results/h200_v3_grid.json [--peers sdpa-flash,sdpa-cudnn]
    python benchmarks/compare_peers.py results/h200_v3_grid.json --anchors PEERS.md --anchor-peer seed

Prints one line per (dtype, d, n, causal, mode) with our rate and ours/peer for each peer, and
marks the cases below 1.0x of the first peer. With --anchors, the peer's rates come instead from
a markdown table of earlier measurements on the same card (columns "dtype | d | n | causal | ...
| <peer> fwd | ... | <peer> f+b | ..."), for peers that cannot run beside us (the original
package is not installed on the benchmark machine).
"""
import argparse
import collections
import json

OURS = "cupy-cosine-attn"


def anchor_rates(path, peer):
    """{(dtype, d, n, 'causal'/'full', mode): TFLOP/s} of `peer` from a markdown anchor table."""
    rates, cols = {}, None
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "dtype" in cells and "causal" in cells:
            cols = cells
            continue
        if cols is None or len(cells) != len(cols) or not cells[1].isdigit():
            continue
        row = dict(zip(cols, cells))
        for mode, col in (("fwd", f"{peer} fwd"), ("fwdbwd", f"{peer} f+b")):
            try:
                rates[(row["dtype"], int(row["d"]), int(row["n"]),
                       "causal" if row["causal"] == "yes" else "full", mode)] = float(row[col])
            except (KeyError, ValueError):
                pass                      # a dash: not measured
    return rates


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--peers", default="sdpa-flash,sdpa-cudnn")
    ap.add_argument("--anchors", help="markdown table of earlier peer measurements")
    ap.add_argument("--anchor-peer", default="seed", help="column prefix of the peer in --anchors")
    a = ap.parse_args()
    peers = [a.anchor_peer] if a.anchors else a.peers.split(",")
    rows = collections.defaultdict(dict)
    for r in json.load(open(a.json))["results"]:
        if r.get("tflops"):
            key = (r["dtype"], r["d"], r["i"], "causal" if r["causal"] else "full", r["mode"])
            rows[key][r["contender"]] = r["tflops"]
    if a.anchors:
        for key, rate in anchor_rates(a.anchors, a.anchor_peer).items():
            if key in rows:
                rows[key][a.anchor_peer] = rate
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
