"""Warp stall samples of one kernel from Nsight Compute's source page exported as CSV
(`ncu -i report.ncu-rep --page source --csv --print-source sass > x.csv`, as
benchmarks/gpu_probe_ncu.sh writes it): the share of each stall reason over the whole kernel,
then the instructions holding the most samples with their two largest reasons.

    python benchmarks/ncu_stalls.py x.csv [--top 30] [--phases]

--phases: instead, the samples and executed instructions of each stretch of SASS between
landmarks (wgmma waits and arrives, the first wgmma of a run, barriers, mbarrier waits, proxy
fences, TMA operations), in program order: where in a tile the warps wait.

Samples say where warps wait, not what is on the critical path: with two warpgroups per SM one
may wait while the other keeps the tensor cores busy (NOTES.md, v7: the dQ copy loop held a fifth
of the backward's samples; removing it gained 1-5%).
"""
import argparse
import collections
import csv


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


LANDMARKS = ("WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE", "BAR.SYNC", "BAR.ARV", "SYNCS.PHASECHK",
             "FENCE.VIEW", "UTMALDG", "UTMAREDG", "UBLKRED")
SAMPLES = "Warp Stall Sampling (All Samples)"


def phases(data, least=0.003):
    """Print (first address, share of samples, instructions executed, next landmark) per stretch."""
    total = sum(number(row[SAMPLES]) for row in data) or 1.0
    share = executed = 0.0
    start, in_mma = data[0]["Address"][-5:], False
    for row in data:
        src = row["Source"]
        mma = "HGMMA" in src
        if any(k in src for k in LANDMARKS) or (mma and not in_mma):
            if share / total > least:
                print(f"{start}  {100 * share / total:5.2f}%  exec={executed:.0f}  -> {src.strip()[:60]}")
            share = executed = 0.0
            start = row["Address"][-5:]
        share += number(row[SAMPLES])
        executed += number(row["Instructions Executed"])
        in_mma = mma
    print(f"{start}  {100 * share / total:5.2f}%")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--phases", action="store_true")
    a = ap.parse_args()
    rows = list(csv.reader(open(a.csv)))
    head = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    names = rows[head]
    data = [dict(zip(names, r)) for r in rows[head + 1:] if len(r) == len(names)]
    if a.phases:
        phases(data)
        return
    reasons = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    totals = collections.Counter()
    for row in data:
        for r in reasons:
            totals[r] += number(row[r])
    total = sum(totals.values()) or 1.0
    print(f"{len(data)} instructions, {total:.0f} samples")
    for r, v in totals.most_common(12):
        print(f"  {r:28s} {100 * v / total:5.1f}%")
    print("instructions with the most samples:")
    key = "Warp Stall Sampling (All Samples)"
    for row in sorted(data, key=lambda x: -number(x[key]))[:a.top]:
        top = sorted(((number(row[r]), r) for r in reasons), reverse=True)[:2]
        print(f"  {row['Address'][-5:]} {100 * number(row[key]) / total:5.1f}%  {row['Source'][:72]:72s} "
              + " ".join(f"{r[6:]}={100 * v / total:.1f}" for v, r in top))


if __name__ == "__main__":
    main()
