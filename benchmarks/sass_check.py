"""SASS of the Hopper kernels: compile each variant to a cubin with NVRTC (sm_90a), disassemble
with cuobjdump, count the instructions that matter (HGMMA = wgmma on the tensor cores, HMMA =
mma.sync, MUFU.EX2, local-memory spills LDL/STL, barriers) and report registers. Needs NVRTC and
cuobjdump (CUDA toolkit); no GPU.

    python benchmarks/sass_check.py --out DIR
"""
import argparse
import re
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    lines = []
    for spec in hopper_launch.specs():
        data, log = cubin(spec)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(data)
            f.flush()
            sass = ""
            for tool in (["cuobjdump", "-sass"], ["nvdisasm", "-c"]):   # cuobjdump may reject NVRTC cubins
                res = subprocess.run(tool + [f.name], capture_output=True, text=True)
                sass = res.stdout
                if "HGMMA" in sass or "HMMA" in sass:
                    break
                print(tool[0], res.returncode, res.stderr[:300])
        counts = {c: len(re.findall(r"\b" + re.escape(c) + r"\b", sass)) for c in COUNT}
        regs = re.findall(r"Used (\d+) registers", log)
        spill = re.findall(r"(\d+) bytes spill stores", log)
        line = (f"{spec.name:45s} regs={regs[-1] if regs else '?'} spill_st={spill[-1] if spill else '?'} "
                + " ".join(f"{k}={v}" for k, v in counts.items()))
        print(line, flush=True)
        lines.append(line)
    Path(args.out, "sass_sm90.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
