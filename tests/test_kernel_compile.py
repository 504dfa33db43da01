"""Every kernel variant compiles through NVRTC for sm_80 and sm_90a, with no GPU needed.

Runs where CuPy and NVRTC are installed (CI installs them); skipped elsewhere. Registers and
spill bytes per variant are printed (pytest -s) from ptxas's report.
"""
import re
from concurrent.futures import ProcessPoolExecutor

import pytest

cupy = pytest.importorskip("cupy")

from cupy_cosine_attn.gpu_launch import all_kernel_specs  # noqa: E402
from cupy_cosine_attn.kernel_build import KernelCompileError, compile_only  # noqa: E402


def _nvrtc_available():
    try:
        cupy.cuda.nvrtc.getVersion()
        return True
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not _nvrtc_available(), reason="NVRTC is not installed")


def _compile(job):
    spec, arch = job
    try:
        log = compile_only(spec, arch)
    except KernelCompileError as e:
        return spec, arch, None, e.log
    regs = re.findall(r"Used (\d+) registers", log)
    spills = re.findall(r"(\d+) bytes spill stores", log)
    return spec, arch, (int(regs[-1]) if regs else -1, int(spills[-1]) if spills else 0), log


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_every_variant_compiles(arch):
    specs = all_kernel_specs()
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_compile, [(s, arch) for s in specs]))
    failed = [(s.name, log) for s, _, res, log in results if res is None]
    for s, _, res, _ in results:
        if res is not None:
            print(f"{arch} {s.source:14s} {s.name:48s} regs={res[0]:4d} spill_bytes={res[1]}")
    assert not failed, "\n\n".join(f"{n}:\n{log}" for n, log in failed[:3])


def test_compile_error_carries_log_and_spec(tmp_path, monkeypatch):
    from cupy_cosine_attn import kernel_build
    from cupy_cosine_attn.kernel_build import KernelSpec
    (tmp_path / "broken.cu").write_text("__global__ void k() { this is not C++; }\n")
    monkeypatch.setattr(kernel_build, "kernel_dir", lambda: tmp_path)
    kernel_build.read_source.cache_clear()
    try:
        with pytest.raises(KernelCompileError) as info:
            compile_only(KernelSpec("broken.cu", "k"), "sm_80")
        assert "broken.cu" in str(info.value) and "error" in info.value.log
    finally:
        kernel_build.read_source.cache_clear()
