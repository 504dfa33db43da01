"""The on-disk kernel cache (kernel_build): key, file format, corruption, concurrency, fallback,
loading through fakes of the GPU side, and `warmup --arch` / `info`. CPU only: NVRTC compiles
real kernels from prep.cu to cubins; nothing is loaded on a GPU."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
from gpu_support import nvrtc_available

from cupy_cosine_attn import cli
from cupy_cosine_attn import kernel_build as kb
from cupy_cosine_attn.kernel_build import KernelCompileError, KernelSpec

ROOT = Path(__file__).resolve().parents[1]
SPEC = KernelSpec("prep.cu", "l2norm_rows<__half>")
OTHER = KernelSpec("prep.cu", "row_dot<__half>")




needs_nvrtc = pytest.mark.skipif(not nvrtc_available(), reason="CuPy with NVRTC not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "kcache"
    monkeypatch.setenv(kb.CACHE_DIR_ENV, str(d))
    kb._forget_loaded()
    yield d
    kb._forget_loaded()


@pytest.fixture
def nvrtc_calls(monkeypatch):
    """Counts NVRTC compilations (every compile of kernel_build goes through _nvrtc_compile)."""
    calls = []
    real = kb._nvrtc_compile

    def counting(source, program_name, name_expression, options):
        calls.append((name_expression, [o for o in options if o.startswith("-arch")]))
        return real(source, program_name, name_expression, options)

    monkeypatch.setattr(kb, "_nvrtc_compile", counting)
    return calls


@pytest.fixture
def kernels_copy(tmp_path, monkeypatch):
    """A private copy of kernels/ that kernel_build reads from."""
    d = tmp_path / "kernels"
    shutil.copytree(kb.kernel_dir(), d, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    monkeypatch.setattr(kb, "kernel_dir", lambda: d)
    kb.read_source.cache_clear()
    yield d
    kb.read_source.cache_clear()


def _entries(d):
    return sorted(p.name for p in Path(d).iterdir() if not p.name.startswith(".locks"))


# ----------------------------------------------------------------------------------------------
# location, arch choice, file format (no NVRTC needed)
# ----------------------------------------------------------------------------------------------

def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv(kb.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert kb.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(kb.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kb.cache_dir() == tmp_path / "xdg" / "cupy-cosine-attn"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert kb.cache_dir() == tmp_path / "home" / ".cache" / "cupy-cosine-attn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert kb.cache_dir() == tmp_path / "home" / ".cache" / "cupy-cosine-attn"


def test_arch_for_compute_capability():
    assert SPEC.arch_for("80") == "sm_80"
    assert SPEC.arch_for("90") == "sm_90"
    assert SPEC.arch_for((8, 6)) == "sm_86"
    assert SPEC.arch_for("12.0") == "sm_120"
    assert SPEC.arch_for("sm_90a") == "sm_90"
    hopper = KernelSpec("x.cu", "wgmma_kernel<64>", hopper=True)
    assert hopper.arch_for("90") == "sm_90a" and hopper.arch_for((9, 0)) == "sm_90a"
    for cc in ("80", "89", "100"):
        with pytest.raises(RuntimeError, match=r"wgmma_kernel<64>.*x\.cu"):
            hopper.arch_for(cc)
    assert hopper.compile_arch("sm_80") == "sm_90a" and SPEC.compile_arch("sm_86") == "sm_86"
    with pytest.raises(ValueError):
        SPEC.arch_for("banana")
    with pytest.raises(ValueError):
        SPEC.compile_arch("compute_80")


def test_arch_option_in_spec_options_means_hopper():
    spec = KernelSpec("cosine_fwd_sm90.cu", "attn_fwd_wgmma<64, __half, 128>",
                      ("-arch=sm_90a", "-DFOO=1"))
    assert spec.is_hopper and not spec.hopper and spec.arch_for("90") == "sm_90a"
    with pytest.raises(RuntimeError, match="attn_fwd_wgmma"):
        spec.arch_for("80")
    assert spec.nvrtc_options() == ("-DFOO=1",)
    assert not KernelSpec("a.cu", "k", ("-DARCH=sm_90a",)).is_hopper


@needs_nvrtc
def test_compile_options_carry_exactly_one_arch():
    spec = KernelSpec("prep.cu", "l2norm_rows<__half>", ("-arch=sm_90a",))
    for asked in ("sm_80", "sm_90", "sm_90a"):
        opts = kb.compile_options(spec, asked)
        assert [o for o in opts if o.startswith("-arch")] == ["-arch=sm_90a"]
    opts = kb.compile_options(SPEC, "sm_86")
    assert [o for o in opts if o.startswith("-arch")] == ["-arch=sm_86"]
    assert opts[0] == "-std=c++17" and "--ptxas-options=-v" in opts


def test_device_arch_falls_back_within_the_major_version(monkeypatch):
    monkeypatch.setattr(kb, "_supported_archs", lambda: (75, 80, 86, 90))
    assert kb.device_arch(SPEC, "89") == "sm_86"
    assert kb.device_arch(SPEC, "86") == "sm_86"
    assert kb.device_arch(SPEC, "100") == "sm_100"          # nothing older of major 10: as is
    assert kb.device_arch(KernelSpec("x.cu", "k", hopper=True), "90") == "sm_90a"


def test_pack_unpack_and_every_check():
    meta = {"key": "k", "lowered_name": "_Z1kv", "log": ""}
    data = kb._pack(meta, b"\x7fELF-cubin")
    assert kb._unpack(data) == (meta, b"\x7fELF-cubin")
    bad = {
        "empty": b"",
        "truncated header": data[:10],
        "truncated payload": data[:-1],
        "appended": data + b"x",
        "flipped cubin byte": data[:-2] + bytes([data[-2] ^ 1]) + data[-1:],
        "bad magic": b"X" + data[1:],
        "other format": data[:8] + (kb.CACHE_FORMAT + 1).to_bytes(4, "little") + data[12:],
    }
    for what, blob in bad.items():
        with pytest.raises(kb.CacheCorruptError):
            kb._unpack(blob)


# ----------------------------------------------------------------------------------------------
# the key
# ----------------------------------------------------------------------------------------------

@needs_nvrtc
def test_key_covers_every_byte_of_included_headers(kernels_copy):
    header = kernels_copy / "tile.cuh"
    assert '#include "tile.cuh"' in (kernels_copy / "prep.cu").read_text()
    base = kb.cache_key(SPEC, "sm_80")
    original = header.read_bytes()
    seen = {base}
    # one byte changed in a comment, at the start, in the middle and at the end of the header
    for pos in (0, len(original) // 2, len(original) - 1):
        changed = bytearray(original)
        changed[pos] = ord("x") if changed[pos] != ord("x") else ord("y")
        header.write_bytes(bytes(changed))
        kb.read_source.cache_clear()
        key = kb.cache_key(SPEC, "sm_80")
        assert key not in seen
        seen.add(key)
    header.write_bytes(original)
    kb.read_source.cache_clear()
    assert kb.cache_key(SPEC, "sm_80") == base                    # deterministic


@needs_nvrtc
def test_key_covers_options_arch_versions_and_name(monkeypatch):
    base = kb.cache_key(SPEC, "sm_80")
    assert kb.cache_key(SPEC, "sm_80") == base
    variants = {
        "arch sm_86": kb.cache_key(SPEC, "sm_86"),
        "arch sm_90": kb.cache_key(SPEC, "sm_90"),
        "arch sm_90a": kb.cache_key(SPEC, "sm_90a"),
        "option": kb.cache_key(KernelSpec(SPEC.source, SPEC.name, ("-DFOO=1",)), "sm_80"),
        "option value": kb.cache_key(KernelSpec(SPEC.source, SPEC.name, ("-DFOO=2",)), "sm_80"),
        "name": kb.cache_key(KernelSpec(SPEC.source, "l2norm_rows<__nv_bfloat16>"), "sm_80"),
        "hopper": kb.cache_key(KernelSpec(SPEC.source, SPEC.name, hopper=True), "sm_90a"),
    }
    with monkeypatch.context() as m:
        m.setattr(kb, "_nvrtc_version", lambda: (99, 1))
        variants["nvrtc version"] = kb.cache_key(SPEC, "sm_80")
    with monkeypatch.context() as m:
        m.setattr(kb, "_package_version", lambda: "99.0.0")
        variants["package version"] = kb.cache_key(SPEC, "sm_80")
    with monkeypatch.context() as m:
        m.setattr(kb, "CACHE_FORMAT", kb.CACHE_FORMAT + 1)
        variants["cache format"] = kb.cache_key(SPEC, "sm_80")
    assert kb.cache_key(SPEC, "sm_80") == base
    keys = list(variants.values())
    assert base not in keys and len(set(keys)) == len(keys), variants
    assert SPEC.key("sm_80") == base


# ----------------------------------------------------------------------------------------------
# hits, corruption, failures
# ----------------------------------------------------------------------------------------------

@needs_nvrtc
def test_cache_hit_does_not_recompile(cache, nvrtc_calls):
    path = kb.compile_to_cache(SPEC, "sm_80")
    assert path is not None and path.parent == cache and path.name.endswith(".kcache")
    assert len(nvrtc_calls) == 1 and nvrtc_calls[0][1] == ["-arch=sm_80"]
    meta, cubin = kb.read_entry(path, expected_key=kb.cache_key(SPEC, "sm_80"))
    assert cubin[:4] == b"\x7fELF"
    assert meta["spec"] == SPEC.as_dict() and meta["arch"] == "sm_80"
    assert meta["lowered_name"].startswith("_Z") and "l2norm_rows" in meta["lowered_name"]
    assert "registers" in meta["log"]
    for _ in range(3):
        again = kb.compile_cubin(SPEC, "sm_80")
        assert not again.compiled and again.path == path and again.cubin == cubin
    assert kb.compile_to_cache(SPEC, "sm_80") == path and kb.lookup(SPEC, "sm_80") == path
    assert len(nvrtc_calls) == 1
    kb.compile_to_cache(SPEC, "sm_90a")                       # another arch: another entry
    assert len(nvrtc_calls) == 2 and kb.cache_stats()["entries"] == 2
    assert kb.clear_cache() == 2 and kb.cache_stats()["entries"] == 0
    assert kb.lookup(SPEC, "sm_80") is None


@needs_nvrtc
def test_stale_temp_files_are_swept(cache):
    cache.mkdir(parents=True)
    stale, fresh = cache / ".tmp-0123456789abcdef-x.part", cache / ".tmp-fedcba9876543210-y.part"
    stale.write_bytes(b"half a file")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    assert kb.cache_stats()["temp_files"] == 2
    kb.compile_to_cache(SPEC, "sm_80")
    assert not stale.exists() and fresh.exists()              # a live writer's file stays
    assert kb.clear_cache() == 1 and not fresh.exists()


def _corruptions():
    def truncate(b):
        return b[: len(b) // 2]

    def flip(b):
        return b[:-100] + bytes([b[-100] ^ 0x40]) + b[-99:]

    def header_only(b):
        return b[:56]

    def garbage(b):
        return os.urandom(len(b))

    def empty(b):
        return b""

    return [truncate, flip, header_only, garbage, empty]


@needs_nvrtc
@pytest.mark.parametrize("corrupt", _corruptions(), ids=lambda f: f.__name__)
def test_corrupt_entry_is_detected_deleted_and_recompiled(cache, nvrtc_calls, corrupt):
    path = kb.compile_to_cache(SPEC, "sm_80")
    good = path.read_bytes()
    path.write_bytes(corrupt(good))
    with pytest.warns(RuntimeWarning, match="bad kernel cache file"):
        built = kb.compile_cubin(SPEC, "sm_80")
    assert built.compiled and built.path == path
    assert len(nvrtc_calls) == 2
    meta, cubin = kb.read_entry(path, expected_key=built.key)
    assert cubin == built.cubin and cubin[:4] == b"\x7fELF"
    assert _entries(cache) == [path.name]


@needs_nvrtc
def test_entry_of_another_key_is_not_loaded(cache, nvrtc_calls):
    a = kb.compile_to_cache(SPEC, "sm_80")
    b = kb.compile_to_cache(OTHER, "sm_80")
    shutil.copyfile(b, a)                  # a valid file under the wrong name
    with pytest.warns(RuntimeWarning, match="another key"):
        built = kb.compile_cubin(SPEC, "sm_80")
    assert built.compiled and "l2norm_rows" in built.lowered_name
    assert kb.read_entry(a)[0]["spec"]["name"] == SPEC.name


@needs_nvrtc
def test_compile_error_carries_log_and_writes_nothing(cache, kernels_copy):
    (kernels_copy / "broken.cu").write_text("__global__ void k() { this is not C++; }\n")
    spec = KernelSpec("broken.cu", "k")
    with pytest.raises(KernelCompileError) as info:
        kb.compile_to_cache(spec, "sm_80")
    assert info.value.spec == spec and info.value.arch == "sm_80" and "error" in info.value.log
    assert "broken.cu" in str(info.value)
    assert not cache.exists() or _entries(cache) == []


@needs_nvrtc
def test_compile_only_still_returns_the_ptxas_log(cache):
    log = kb.compile_only(SPEC, "sm_90a")
    assert "Used" in log and "registers" in log and "spill" in log
    assert not cache.exists()                                 # compile_only bypasses the cache


@needs_nvrtc
def test_unwritable_cache_dir_compiles_in_memory_and_warns_once(tmp_path, monkeypatch,
                                                                 nvrtc_calls):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(kb.CACHE_DIR_ENV, str(blocker / "cache"))    # fails even for root
    monkeypatch.setattr(kb, "_WARNED_DIRS", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kb.compile_cubin(SPEC, "sm_80")
        second = kb.compile_cubin(OTHER, "sm_80")
        assert kb.compile_to_cache(SPEC, "sm_80") is None
    unwritable = [w for w in caught if "not writable" in str(w.message)]
    assert len(unwritable) == 1 and issubclass(unwritable[0].category, RuntimeWarning)
    assert first.path is None and first.compiled and first.cubin[:4] == b"\x7fELF"
    assert second.path is None and "row_dot" in second.lowered_name
    assert len(nvrtc_calls) == 3


@needs_nvrtc
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_cache_dir_falls_back(tmp_path, monkeypatch):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    monkeypatch.setenv(kb.CACHE_DIR_ENV, str(d))
    monkeypatch.setattr(kb, "_WARNED_DIRS", set())
    try:
        with pytest.warns(RuntimeWarning, match="not writable"):
            assert kb.compile_cubin(SPEC, "sm_80").path is None
    finally:
        d.chmod(0o700)


# ----------------------------------------------------------------------------------------------
# several processes at once
# ----------------------------------------------------------------------------------------------

CHILD = """
    import json, os, sys, time
    from cupy_cosine_attn import kernel_build as kb
    from cupy_cosine_attn.kernel_build import KernelSpec
    kb._USE_LOCK = {use_lock}
    calls = []
    real = kb._nvrtc_compile
    def counting(*a):
        calls.append(1)
        return real(*a)
    kb._nvrtc_compile = counting
    kb.cache_key(KernelSpec("prep.cu", "l2norm_rows<__half>"), "sm_80")   # imports done
    print("ready", flush=True)
    while not os.path.exists({go!r}):
        time.sleep(0.002)
    built = kb.compile_cubin(KernelSpec("prep.cu", "l2norm_rows<__half>"), "sm_80")
    print(json.dumps({{"compiled": len(calls), "path": str(built.path),
                       "cubin": len(built.cubin)}}), flush=True)
"""


@needs_nvrtc
@pytest.mark.parametrize("use_lock", [True, False], ids=["lock", "no-lock"])
def test_concurrent_processes_share_one_entry(tmp_path, use_lock):
    cache_d, go = tmp_path / "kcache", tmp_path / "go"
    env = dict(os.environ, **{kb.CACHE_DIR_ENV: str(cache_d)})
    code = textwrap.dedent(CHILD.format(use_lock=use_lock, go=str(go)))
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for _ in range(4)]
    try:
        for p in procs:                                        # all imported, none compiling
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        go.write_text("go")
        results = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    entries = kb.cache_entries(cache_d)
    assert len(entries) == 1
    assert {r["path"] for r in results} == {str(entries[0])}
    assert len({r["cubin"] for r in results}) == 1
    meta, cubin = kb.read_entry(entries[0])
    assert meta["spec"]["name"] == "l2norm_rows<__half>" and cubin[:4] == b"\x7fELF"
    assert [p.name for p in cache_d.iterdir() if p.name.startswith(".tmp")] == []
    assert kb.cache_stats(cache_d)["temp_files"] == 0
    total = sum(r["compiled"] for r in results)
    if use_lock:
        assert total == 1, results                             # nobody duplicated the work
    else:
        assert 1 <= total <= 4


@needs_nvrtc
def test_threads_load_once(cache, monkeypatch, nvrtc_calls):
    loads = []
    monkeypatch.setattr(kb, "_current_device_id", lambda: 0)
    monkeypatch.setattr(kb, "_current_device", lambda: (0, "80"))
    monkeypatch.setattr(kb, "_load_module", lambda cubin: loads.append(cubin) or FakeModule())
    got, barrier = [], threading.Barrier(6)

    def worker():
        barrier.wait()
        got.append(kb.get_function(SPEC))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 6 and all(g is got[0] for g in got)
    assert len(loads) == 1 and len(nvrtc_calls) == 1


# ----------------------------------------------------------------------------------------------
# get_function, through fakes of the CuPy GPU side
# ----------------------------------------------------------------------------------------------

class FakeFunction:
    def __init__(self, name):
        self.name, self.ptr, self.calls = name, 1234, []

    def __call__(self, grid, block, args, shared_mem=0, stream=None):
        self.calls.append((grid, block, args, shared_mem, stream))


class FakeModule:
    def get_function(self, name):
        return FakeFunction(name)


@needs_nvrtc
def test_get_function_picks_arch_loads_and_memoises(cache, monkeypatch, nvrtc_calls):
    device = {"id": 0, "cc": "80"}
    loads = []
    monkeypatch.setattr(kb, "_current_device_id", lambda: device["id"])
    monkeypatch.setattr(kb, "_current_device", lambda: (device["id"], device["cc"]))
    monkeypatch.setattr(kb, "_load_module", lambda cubin: loads.append(cubin) or FakeModule())

    fn = kb.get_function(SPEC)
    assert isinstance(fn, kb.CubinKernel) and fn.arch == "sm_80" and fn.name == SPEC.name
    assert fn.kernel.name == fn.lowered_name and "l2norm_rows" in fn.lowered_name
    assert loads[0][:4] == b"\x7fELF" and fn.path == kb.lookup(SPEC, "sm_80")
    assert kb.get_function(SPEC) is fn and len(loads) == 1 and len(nvrtc_calls) == 1

    fn((3,), [64], ("a", 1), shared_mem=4096)                # called like a cupy.RawKernel
    assert fn.kernel.calls == [((3,), (64,), ("a", 1), 4096, None)]

    device.update(id=1, cc="90")                               # another device: its own load
    fn90 = kb.get_function(SPEC)
    assert fn90 is not fn and fn90.arch == "sm_90" and len(loads) == 2

    kb._forget_loaded()                                        # a new process: disk hit only
    device.update(id=0, cc="80")
    assert kb.get_function(SPEC).arch == "sm_80" and len(nvrtc_calls) == 2

    hopper = KernelSpec("prep.cu", "l2norm_rows<__half>", hopper=True)
    with pytest.raises(RuntimeError, match=r"l2norm_rows<__half>.*prep\.cu.*9\.0"):
        kb.get_function(hopper)
    device.update(id=1, cc="90")
    fh = kb.get_function(hopper)
    assert fh.arch == "sm_90a" and kb.lookup(hopper, "sm_90a") == fh.path
    assert kb.read_entry(fh.path)[0]["options"].count("-arch=sm_90a") == 1


def test_cubin_kernel_attributes_go_through_the_driver(monkeypatch):
    calls = []

    class FakeDriver:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
        CU_FUNC_ATTRIBUTE_NUM_REGS = 4

        @staticmethod
        def funcSetAttribute(ptr, attr, value):
            calls.append(("set", ptr, attr, value))

        @staticmethod
        def funcGetAttribute(attr, ptr):
            calls.append(("get", attr, ptr))
            return 96

    monkeypatch.setattr(kb, "_driver", lambda: FakeDriver)
    k = kb.CubinKernel(FakeFunction("_Z1kv"), SPEC, "sm_80", "_Z1kv")
    k.max_dynamic_shared_size_bytes = 100 * 1024
    assert k.num_regs == 96
    assert calls == [("set", 1234, 8, 102400), ("get", 4, 1234)]
    assert "l2norm_rows" in repr(k)


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------

@needs_nvrtc
def test_warmup_with_arch_compiles_without_gpu(cache, nvrtc_calls, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    argv = ["warmup", "--arch", "sm_80", "--dims", "64", "--dtypes", "fp16"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("[")]
    # 14 portable variants compile; the 4 Hopper-only ones are listed as skipped for sm_80
    assert len(lines) == 18 and lines[0].startswith("[1/18] l2norm_rows<__half> sm_80 ")
    assert lines[13].startswith("[14/18] attn_bwd_q_mma<64, __half> sm_80 ")
    assert all(ln.endswith(" s") for ln in lines[:14])
    assert all("wgmma" in ln and "skip" in ln for ln in lines[14:])
    assert len(nvrtc_calls) == 14 and kb.cache_stats()["entries"] == 14
    assert "14 compiled, 0 cached" in out

    assert cli.main(argv) == 0                                 # second run: all from the cache
    out = capsys.readouterr().out
    assert len(nvrtc_calls) == 14 and out.count(" cached\n") == 14

    assert cli.main(["info"]) == 0
    info = capsys.readouterr().out
    assert f"kernel cache    {cache} (14 entries" in info


@needs_nvrtc
def test_warmup_sm90a_compiles_what_a_hopper_gpu_loads(cache, nvrtc_calls, capsys):
    assert cli.main(["warmup", "--arch", "sm_90a", "--dims", "64", "--dtypes", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "[1/18] l2norm_rows<__nv_bfloat16> sm_90 " in out
    assert "attn_fwd_wgmma<64, __nv_bfloat16, 128, 1, false, true, false, 0, false> sm_90a " in out   # Hopper-only
    assert "attn_fwd_wgmma<64, __nv_bfloat16, 128, 3, false, true, true, 1, false> sm_90a " in out
    assert {tuple(a) for _, a in nvrtc_calls} == {("-arch=sm_90",), ("-arch=sm_90a",)}
    for spec in cli.warmup_specs(["bfloat16"], [64]):
        assert kb.lookup(spec, kb.device_arch(spec, "90")) is not None


def test_warmup_jobs_skip_hopper_variants_off_hopper():
    hopper = KernelSpec("x.cu", "wgmma<64>", hopper=True)
    jobs = cli.warmup_jobs([SPEC, hopper], ["sm_80", "sm_90a"])
    assert [(s.name, a, t) for s, a, t in jobs] == [
        (SPEC.name, "sm_80", "sm_80"), ("wgmma<64>", None, "sm_80"),
        (SPEC.name, "sm_90", "sm_90a"), ("wgmma<64>", "sm_90a", "sm_90a")]
    specs = cli.warmup_specs(["float16", "bfloat16"], [64, 128])
    assert len(specs) == len(set(specs)) == 55         # 37 portable + 18 Hopper-only


def test_warmup_arguments(capsys, monkeypatch):
    a = cli.build_parser().parse_args(["warmup", "--arch", "sm_80,90,sm_90a", "--dims", "64",
                                       "--dtypes", "fp16,bf16"])
    assert a.arch == ["sm_80", "sm_90", "sm_90a"] and a.dims == [64]
    assert a.dtypes == ["float16", "bfloat16"]
    for bad in (["--arch", "volta"], ["--dims", "x"], ["--dtypes", "int8"]):
        with pytest.raises(SystemExit) as e:
            cli.build_parser().parse_args(["warmup", *bad])
        assert e.value.code == 2
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    assert cli.main(["warmup"]) == 0
    assert "nothing to compile" in capsys.readouterr().out
