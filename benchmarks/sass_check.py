"""SASS of the Hopper kernels: compile each variant to a cubin with NVRTC (sm_90a), disassemble
with cuobjdump or nvdisasm, count the instructions that matter (HGMMA = wgmma on the tensor cores,
HMMA = mma.sync, MUFU.EX2, local-memory spills LDL/STL, barriers) and report registers. Needs NVRTC
and cuobjdump or nvdisasm (CUDA toolkit); no GPU.

`tile_window` is the static cost of one tile's elementwise pass: the window of SASS holding as many
consecutive MUFU.EX2 as one thread computes per tile, with the fewest branches in it (the
straight-line copy the common tile runs, when the kernel has one): its instruction and branch
counts.

    python benchmarks/sass_check.py --out DIR [--defaults]
"""
import argparse
import bisect
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cupy_cosine_attn import hopper_launch  # noqa: E402
from cupy_cosine_attn.kernel_build import read_source  # noqa: E402

COUNT = ("HGMMA", "HMMA", "MUFU.EX2", "LDL", "STL", "BAR.SYNC", "WARPSYNC", "LDSM", "LDGSTS")


def cubin(spec, arch="sm_90a"):
    from cupy.cuda import nvrtc
    opts = ["-std=c++17", f"-arch={arch}", "--ptxas-options=-v"]
    try:
        from cuda import pathfinder
        inc = pathfinder.find_nvidia_header_directory("cudart")
        if inc:
            opts.append(f"-I{inc}")
    except Exception:  # noqa: BLE001
        pass
    opts += [o for o in spec.options if not o.startswith("-arch")]
    prog = nvrtc.createProgram(read_source(spec.source), spec.source, [], [])
    nvrtc.addNameExpression(prog, spec.name)
    nvrtc.compileProgram(prog, opts)
    # CuPy's getCUBIN drops the image's last byte (a C-string terminator strip); ELF tools need it.
    return bytes(nvrtc.getCUBIN(prog)) + b"\0", nvrtc.getProgramLog(prog)


def exps_per_tile(spec):
    """Exponentials one thread computes per tile: forward BN/2 (64 rows x BN keys over 128
    threads), backward BM/2 (64 keys x BM queries)."""
    args = [a.strip() for a in spec.name[spec.name.index("<") + 1:-1].split(",")]
    return int(args[2]) // 2 if spec.name.startswith("attn_fwd") else int(args[4]) // 2


def tile_window(sass, n):
    """(branches, instructions) of the fewest-branch SASS window spanning n consecutive MUFU.EX2."""
    ins = [line for line in sass.splitlines() if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
    mufu = [i for i, line in enumerate(ins) if "MUFU.EX2" in line]
    bra = [i for i, line in enumerate(ins) if re.search(r"\bBRA\b", line)]
    best = None
    for a in range(len(mufu) - n + 1):
        s, e = mufu[a], mufu[a + n - 1]
        cand = (bisect.bisect_left(bra, e) - bisect.bisect_left(bra, s), e - s + 1)
        best = cand if best is None or cand < best else best
    return best or (-1, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--defaults", action="store_true", help="only the variants a call launches")
    args = ap.parse_args()
    lines = []
    specs = hopper_launch.specs()
    if args.defaults:
        specs = [spec for ct in ("__half", "__nv_bfloat16") for d in hopper_launch.SM90_HEAD_DIMS
                 for spec in hopper_launch.default_specs(ct, d)]
    for spec in specs:
        data, log = cubin(spec)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(data)
            f.flush()
            sass = ""
            for tool in (["cuobjdump", "-sass"], ["nvdisasm", "-c"]):   # cuobjdump may reject NVRTC cubins
                if not shutil.which(tool[0]):
                    continue
                res = subprocess.run(tool + [f.name], capture_output=True, text=True)
                sass = res.stdout
                if "HGMMA" in sass or "HMMA" in sass:
                    break
                print(tool[0], res.returncode, res.stderr[:300])
        counts = {c: len(re.findall(r"\b" + re.escape(c) + r"\b", sass)) for c in COUNT}
        # every SASS instruction line carries its offset comment: /*0a40*/
        counts["instructions"] = len(re.findall(r"/\*[0-9a-f]{4,}\*/", sass))
        counts["tile_window_branches"], counts["tile_window"] = tile_window(sass, exps_per_tile(spec))
        regs = re.findall(r"Used (\d+) registers", log)
        spill = re.findall(r"(\d+) bytes spill stores", log)
        line = (f"{spec.name:45s} regs={regs[-1] if regs else '?'} spill_st={spill[-1] if spill else '?'} "
                + " ".join(f"{k}={v}" for k, v in counts.items()))
        print(line, flush=True)
        lines.append(line)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "sass_sm90.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
