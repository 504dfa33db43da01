"""Do two checkouts compile to the same machine code? Compiles every Hopper variant (sm_90a) and
every portable variant (sm_80, and sm_90 as a Hopper GPU loads them) from each with this
machine's NVRTC (no GPU needed), disassembles with nvdisasm and compares the SASS text (the
cubins themselves carry a few bytes that differ from compile to compile).

    git worktree add /tmp/tested <commit that ran on the GPU>
    python benchmarks/compare_sass.py /tmp/tested . [--only REGEX]

Used to show that source edits made after a GPU run (comments, launch-layer code) leave the
tested kernels unchanged.
"""
import argparse
import hashlib
import importlib
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def sass_digests(root, only=None):
    """{variant@arch: sha256 of its SASS} for every kernel variant of the checkout at `root`
    (or those whose name matches the regular expression `only`)."""
    root = str(Path(root).resolve())
    for name in [m for m in sys.modules if m.startswith("cupy_cosine_attn")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        kb = importlib.import_module("cupy_cosine_attn.kernel_build")
        hl = importlib.import_module("cupy_cosine_attn.hopper_launch")
        gl = importlib.import_module("cupy_cosine_attn.gpu_launch")
        assert kb.__file__.startswith(root), f"imported {kb.__file__}, not from {root}"
        # An editable install resolves the packaged kernels to its own checkout whatever path
        # the package was imported from: read this checkout's sources explicitly.
        kb.kernel_dir = lambda: Path(root, "kernels")
        jobs = [(spec, "sm_90a") for spec in hl.specs()]
        jobs += [(spec, arch) for spec in gl.all_kernel_specs() if not spec.is_hopper
                 for arch in ("sm_80", "sm_90")]
        if only:
            jobs = [(spec, arch) for spec, arch in jobs if re.search(only, spec.name)]
        out = {}
        for spec, arch in jobs:
            cubin = kb._compile(spec, arch)[0] + b"\0"   # CuPy's getCUBIN drops the last byte
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(cubin)
                f.flush()
                sass = subprocess.run(["nvdisasm", "-c", f.name], capture_output=True, text=True,
                                      check=True).stdout
            out[f"{spec.name}@{arch}"] = hashlib.sha256(sass.encode()).hexdigest()
        return out
    finally:
        sys.path.remove(root)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--only", metavar="REGEX", help="compare only the variants whose name matches")
    a = ap.parse_args()
    old, new = sass_digests(a.old, a.only), sass_digests(a.new, a.only)
    differ = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    print(f"variants: {len(old)} old, {len(new)} new, {len(old.keys() & new.keys())} in both")
    print(f"only old: {sorted(old.keys() - new.keys())}")
    print(f"only new: {sorted(new.keys() - old.keys())}")
    print(f"SASS differs: {differ if differ else 'none'}")
    return 1 if differ or old.keys() != new.keys() else 0


if __name__ == "__main__":
    sys.exit(main())
