"""The package imports with NumPy alone, and a built wheel carries the kernel sources."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = r'''
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "cupy"):
            raise ImportError("blocked " + name)
sys.meta_path.insert(0, Block())
import numpy as np
import cupy_cosine_attn as ca
q = np.random.default_rng(0).standard_normal((1, 2, 9, 8)).astype(np.float32)
out, lse = ca.forward(q, q, q, causal=True)
ref = ca.plain_cosine_sim_attention(q, q, q, causal=True)
assert np.abs(out - ref).max() < 1e-5, np.abs(out - ref).max()
assert "torch" not in sys.modules and "cupy" not in sys.modules
print("ok")
'''


def test_imports_and_runs_without_torch_or_cupy():
    res = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


def test_wheel_contains_kernel_sources(tmp_path):
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.fail(res.stderr)
    wheel = next(tmp_path.glob("cupy_cosine_attn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    assert "cupy_cosine_attn/kernels/__init__.py" in names
    for name in sources:
        assert f"cupy_cosine_attn/kernels/{name}" in names, name
