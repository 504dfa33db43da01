"""Packaging: a built wheel carries the CUDA sources inside the package, and the package imports
and computes with NumPy alone (torch and CuPy imports refused)."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(code, cwd, env_extra=None):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    wheels = list(out.glob("cupy_cosine_attn-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contains_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))
    assert any(s.endswith(".cu") for s in sources), "no kernels/*.cu in the source tree"
    for name in sources:
        assert f"cupy_cosine_attn/kernels/{name}" in names, f"{name} missing from {wheel.name}"
    assert "cupy_cosine_attn/__init__.py" in names
    # Nothing of the source layout leaks to the top level of site-packages.
    assert not any(n.startswith("kernels/") for n in names)


def test_installed_wheel_finds_kernel_sources(wheel, tmp_path):
    """Unpacked like an install into site-packages, away from the checkout."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    res = _run(f"""
        import importlib.resources as r, pathlib
        import cupy_cosine_attn as ca
        site = pathlib.Path({str(site)!r}).resolve()
        assert pathlib.Path(ca.__file__).resolve().is_relative_to(site), ca.__file__
        names = sorted(p.name for p in r.files("cupy_cosine_attn.kernels").iterdir())
        assert any(n.endswith(".cu") for n in names), names
        print(" ".join(names))
        """, cwd=tmp_path, env_extra={"PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    expected = {p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert expected <= set(res.stdout.split())


def _kernel_sources():
    return sorted(p.name for p in (ROOT / "kernels").iterdir() if p.suffix in (".cu", ".cuh"))


@pytest.fixture(scope="module")
def clean_wheel(tmp_path_factory):
    """A wheel built from a copy of the files git would check out (tracked plus untracked, not
    ignored): no stale build/ or egg-info directory can add or hide files."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                                 "--exclude-standard"], cwd=ROOT, capture_output=True,
                                check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    src = tmp_path_factory.mktemp("clean_src")
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("clean_wheel")
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    (wheel,) = out.glob("cupy_cosine_attn-*.whl")
    return wheel


def test_clean_wheel_carries_exactly_the_kernel_sources(clean_wheel):
    names = zipfile.ZipFile(clean_wheel).namelist()
    packaged = sorted(n.rsplit("/", 1)[1] for n in names
                      if n.startswith("cupy_cosine_attn/kernels/") and n.endswith((".cu", ".cuh")))
    assert packaged == _kernel_sources()
    assert not any(n.endswith((".cu", ".cuh")) and not n.startswith("cupy_cosine_attn/kernels/")
                   for n in names)


def test_installed_wheel_compiles_the_same_bytes(clean_wheel, tmp_path):
    """The kernel cache key hashes read_source(); from an installed wheel it must read the very
    bytes the checkout has (same keys, so a cache filled from either serves both)."""
    from cupy_cosine_attn.kernel_build import read_source
    site = tmp_path / "site"
    zipfile.ZipFile(clean_wheel).extractall(site)
    sources = [n for n in _kernel_sources() if n.endswith(".cu")]
    res = _run(f"""
        import hashlib, json, pathlib
        from cupy_cosine_attn import kernel_build as kb
        site = pathlib.Path({str(site)!r}).resolve()
        assert kb.kernel_dir().resolve().is_relative_to(site), kb.kernel_dir()
        print(json.dumps({{n: hashlib.sha256(kb.read_source(n).encode()).hexdigest()
                          for n in {sources!r}}}))
        """, cwd=tmp_path, env_extra={"PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    installed = json.loads(res.stdout.strip().splitlines()[-1])
    assert installed == {n: hashlib.sha256(read_source(n).encode()).hexdigest() for n in sources}


BLOCKED = """
    import sys

    class Refuse:
        # Refuses torch and cupy (and their submodules) as if they were not installed.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "cupy"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Refuse())
    for refused in ("torch", "cupy"):
        try:
            __import__(refused)
        except ImportError:
            pass
        else:
            raise SystemExit("the import blocker does not work")

    import numpy as np
    import cupy_cosine_attn as ca

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, 9, 16)).astype(np.float32) for _ in range(3))
    mask = rng.random((2, 9)) > 0.2
    bias = rng.standard_normal((3, 9, 9)).astype(np.float32)
    kw = dict(mask=mask, attn_bias=bias, causal=True, groups=2)
    out, lse = ca.forward(q, k, v, **kw)
    assert out.shape == q.shape and out.dtype == np.float32 and lse.shape == q.shape[:-1]
    ref = ca.plain_cosine_sim_attention(q, k, v, **kw)
    assert np.abs(out - ref).max() < 1e-4, np.abs(out - ref).max()
    assert isinstance(ca.flash_cosine_sim_attention(q, k, v, **kw), np.ndarray)
    dq, dk, dv, db = ca.backward(np.ones_like(out), q, k, v, out, lse, **kw)
    assert dq.shape == q.shape and db.shape == bias.shape and np.isfinite(dq).all()
    (qn,) = ca.l2norm_tensors(q)
    assert np.allclose(np.linalg.norm(qn, axis=-1), 1, atol=1e-5)
    assert not any(m.split(".")[0] in ("torch", "cupy") for m in sys.modules), \
        [m for m in sys.modules if m.split(".")[0] in ("torch", "cupy")]
    print("ok")
"""


def test_imports_and_computes_without_torch_or_cupy():
    res = _run(BLOCKED, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("ok")
