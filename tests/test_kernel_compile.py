"""Every kernel variant compiles through NVRTC for sm_80 and sm_90a, with no GPU needed.

Runs where CuPy and NVRTC are installed (CI installs them); skipped elsewhere. Registers and
spill bytes per variant are printed (pytest -s) from ptxas's report.
"""
import re
from concurrent.futures import ProcessPoolExecutor

import pytest
from gpu_support import nvrtc_available

cupy = pytest.importorskip("cupy")

from cupy_cosine_attn.gpu_launch import all_kernel_specs  # noqa: E402
from cupy_cosine_attn.kernel_build import KernelCompileError, compile_only  # noqa: E402




pytestmark = pytest.mark.skipif(not nvrtc_available(), reason="NVRTC is not installed")


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


def test_hopper_variants_compile_for_sm90a():
    """The wgmma kernels (sm_90a only) compile; ptxas reports registers and spills for each."""
    from cupy_cosine_attn import hopper_launch
    specs = hopper_launch.specs()
    assert specs and all(s.is_hopper for s in specs)
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_compile, [(s, "sm_90a") for s in specs]))
    failed = [(s.name, log) for s, _, res, log in results if res is None]
    for s, _, res, _ in results:
        if res is not None:
            print(f"sm_90a {s.source:18s} {s.name:48s} regs={res[0]:4d} spill_bytes={res[1]}")
    assert not failed, "\n\n".join(f"{n}:\n{log}" for n, log in failed[:3])


def test_hopper_source_refuses_a_target_without_wgmma():
    """Compiled for plain sm_90 (no 'a' features) the wgmma kernels stop with a clear #error."""
    from cupy_cosine_attn.kernel_build import KernelSpec
    spec = KernelSpec("cosine_fwd_sm90.cu", "attn_fwd_wgmma<64, __half, 128, 1, true, true, false, 0, false>")
    with pytest.raises(KernelCompileError) as info:
        compile_only(spec, "sm_90")
    assert "sm_90a" in info.value.log


def test_generated_wgmma_header_is_current():
    import importlib.util
    from cupy_cosine_attn.kernel_build import kernel_dir
    path = kernel_dir() / "gen_wgmma.py"
    mod_spec = importlib.util.spec_from_file_location("gen_wgmma", path)
    gen = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(gen)
    assert (kernel_dir() / "wgmma_ops.cuh").read_text() == gen.render(), \
        "kernels/wgmma_ops.cuh is stale: run python kernels/gen_wgmma.py"
