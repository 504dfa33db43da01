"""How kernels are compiled, cached on disk and loaded, kept apart from what is compiled
(KernelSpec) and from the ops that launch them.

A spec names a source file in `kernels/`, one template instantiation and extra NVRTC options.
Local `#include "x.cuh"` lines are inlined (`read_source`), so the cache key covers every byte of
every header.

Disk cache (ours, not CuPy's): one file per variant and target arch, `<key>.kcache` in
`cache_dir()`. The key is a sha256 over the inlined source, the source file name, the
instantiation name, every compile option (the `-arch` flag included), the target arch, the NVRTC
version, the package version and `CACHE_FORMAT`. A file holds a fixed header (magic, format,
lengths, sha256 of the payload) followed by JSON metadata (key, lowered name, spec, arch, NVRTC
log) and the cubin. Files are written to a temporary file in the same directory, fsynced and
renamed over the final name (`os.replace`), so readers see either nothing or a whole file; a file
that fails any check (short, bad magic, bad checksum, other key) is deleted and recompiled. A
per-key `fcntl` lock (in `.locks/`) keeps concurrent processes from compiling the same variant
twice; without it the atomic rename still gives last-writer-wins of identical content. An
unwritable cache directory means compiling in memory (one warning per directory and process).

Loading: `get_function(spec)` picks the arch from the current device's compute capability
(`KernelSpec.arch_for`), fetches the cubin through the disk cache, loads it with
`cupy.cuda.function.Module().load(cubin)` and wraps the function in `CubinKernel`, which is
called like a `cupy.RawKernel`. Loaded kernels are memoised per (device, spec) in the process.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import struct
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ._version import __version__

try:  # POSIX only; without it the atomic rename alone keeps the cache consistent
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "KernelSpec", "KernelCompileError", "CubinKernel", "CompiledKernel", "CacheCorruptError",
    "kernel_dir", "read_source", "cache_dir", "cache_key", "compile_options", "compile_cubin",
    "compile_to_cache", "compile_only", "read_entry", "lookup", "cache_entries", "cache_stats",
    "clear_cache", "get_function", "device_arch", "normalize_compute_capability", "CACHE_FORMAT",
    "CACHE_DIR_ENV",
]

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)
_ARCH = re.compile(r"^sm_(\d{2,3})([af]?)$")

CACHE_FORMAT = 1                       # bump when the file layout or the key recipe changes
CACHE_DIR_ENV = "CUPY_COSINE_ATTN_CACHE_DIR"
ENTRY_SUFFIX = ".kcache"
_TMP_PREFIX = ".tmp-"
_MAGIC = b"CCAKCUB\x00"
_HEADER = struct.Struct("<8sIIQ32s")   # magic, format, metadata bytes, cubin bytes, sha256
_LOCK_TIMEOUT_S = 600.0
_USE_LOCK = True                       # tests switch it off to exercise the bare atomic rename

BASE_OPTIONS = ("-std=c++17",)


# ----------------------------------------------------------------------------------------------
# sources and specs
# ----------------------------------------------------------------------------------------------

def kernel_dir() -> Path:
    """The kernels directory: packaged as cupy_cosine_attn.kernels, or the checkout's kernels/."""
    try:
        from importlib.resources import files
        path = Path(str(files("cupy_cosine_attn.kernels")))
        if any(path.glob("*.cu")):
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "kernels"


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    """Source text with local includes inlined (each header once, `#pragma once` honoured)."""
    seen = set()

    def expand(fname):
        if fname in seen:
            return ""
        seen.add(fname)
        text = (kernel_dir() / fname).read_text()
        text = text.replace("#pragma once", "")
        return _INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return f"// cupy-cosine-attn {__version__}\n" + expand(name)


def normalize_compute_capability(cc) -> str:
    """'90' for '90', 90, (9, 0), '9.0' or 'sm_90'/'sm_90a' (the form CuPy's
    `Device().compute_capability` uses)."""
    if isinstance(cc, (tuple, list)) and len(cc) == 2:
        return f"{int(cc[0])}{int(cc[1])}"
    text = str(cc).strip().lower()
    m = _ARCH.match(text)
    if m:
        return m.group(1)
    if re.fullmatch(r"\d+\.\d", text):
        major, minor = text.split(".")
        return f"{int(major)}{minor}"
    if re.fullmatch(r"\d{2,3}", text):
        return text
    raise ValueError(f"not a compute capability: {cc!r} (expected e.g. '90', (9, 0) or 'sm_90')")


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant: source file, template instantiation, extra NVRTC options.

    `hopper=True` marks a variant that uses sm_90a-only instructions (wgmma, setmaxnreg): it is
    always compiled with `-arch=sm_90a` and may only run on a compute capability 9.0 device. An
    `-arch=sm_90a` among `options` means the same; arch options are otherwise ignored (the arch is
    chosen per device or per call).
    """
    source: str
    name: str
    options: Tuple[str, ...] = ()
    hopper: bool = False

    def arch_for(self, compute_capability) -> str:
        """The `-arch` this spec compiles for on a device of `compute_capability` ('90', (9, 0),
        ...): sm_XY, or sm_90a for a Hopper spec. Raises RuntimeError for a Hopper spec on any
        device other than compute capability 9.0."""
        cc = normalize_compute_capability(compute_capability)
        if self.is_hopper:
            if cc != "90":
                raise RuntimeError(
                    f"kernel {self.name} from {self.source} is a Hopper (sm_90a) variant and needs "
                    f"a compute capability 9.0 GPU; this device is sm_{cc}")
            return "sm_90a"
        return f"sm_{cc}"

    def compile_arch(self, arch: str) -> str:
        """The arch actually compiled when `arch` is asked for: sm_90a for Hopper specs."""
        _check_arch(arch)
        return "sm_90a" if self.is_hopper else arch

    def key(self, arch: str = "sm_80") -> str:
        """The disk-cache key of this spec for `arch` (see `cache_key`)."""
        return cache_key(self, arch)

    def as_dict(self) -> dict:
        return {"source": self.source, "name": self.name, "options": list(self.options),
                "hopper": self.is_hopper}

    @property
    def is_hopper(self) -> bool:
        """hopper=True, or -arch=sm_90a (or compute_90a) among the options."""
        return self.hopper or any((_arch_of_option(o) or "").endswith("_90a")
                                  for o in self.options)

    def nvrtc_options(self) -> Tuple[str, ...]:
        """`options` without arch options (compile_options adds the one arch flag)."""
        return tuple(o for o in self.options if _arch_of_option(o) is None)


class KernelCompileError(RuntimeError):
    """NVRTC rejected a variant; carries the spec and the compiler log."""

    def __init__(self, spec: KernelSpec, log: str, arch: Optional[str] = None):
        where = f" for {arch}" if arch else ""
        super().__init__(f"compiling {spec.name} from {spec.source}{where} "
                         f"(options {list(spec.options)}) failed:\n{log}")
        self.spec, self.log, self.arch = spec, log, arch


class CacheCorruptError(ValueError):
    """A cache file that fails a check: short, bad magic or format, bad checksum, other key."""


def _arch_of_option(option: str) -> Optional[str]:
    """'sm_90a' for '-arch=sm_90a', '--gpu-architecture=sm_90a' or '-arch sm_90a'; None for an
    option that sets no arch."""
    m = re.match(r"^(?:-arch|--gpu-architecture)[=\s]\s*(\S+)$", option.strip())
    return m.group(1) if m else None


def _check_arch(arch: str) -> str:
    if not isinstance(arch, str) or not _ARCH.match(arch):
        raise ValueError(f"arch must look like sm_80, sm_90 or sm_90a, got {arch!r}")
    return arch


# ----------------------------------------------------------------------------------------------
# NVRTC
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _nvrtc_version() -> Tuple[int, int]:
    from cupy.cuda import nvrtc
    major, minor = nvrtc.getVersion()
    return int(major), int(minor)


def _package_version() -> str:
    return __version__


@functools.lru_cache(maxsize=None)
def _cuda_include_dirs() -> Tuple[str, ...]:
    """CUDA headers (cuda_fp16.h, ...) for NVRTC: the pip nvidia-* wheels through
    cuda.pathfinder, else $CUDA_PATH / $CUDA_HOME / CuPy's CUDA path."""
    found = []
    try:
        from cuda import pathfinder
        d = pathfinder.find_nvidia_header_directory("cudart")
        if d:
            found.append(str(d))
    except Exception:  # pragma: no cover - depends on the installation
        pass
    if not found:
        roots = [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME")]
        try:
            import cupy.cuda
            roots.append(cupy.cuda.get_cuda_path())
        except Exception:  # pragma: no cover - depends on the installation
            pass
        for root in roots:
            if root and os.path.isfile(os.path.join(root, "include", "cuda_fp16.h")):
                found.append(os.path.join(root, "include"))
                break
    # CUDA 13 keeps libcu++ / nv/target under include/cccl.
    found += [os.path.join(d, "cccl") for d in list(found) if os.path.isdir(os.path.join(d, "cccl"))]
    return tuple(found)


def compile_options(spec: KernelSpec, arch: str) -> List[str]:
    """Every NVRTC option used for `spec` on `arch` (Hopper specs: sm_90a)."""
    arch = spec.compile_arch(arch)
    opts = list(BASE_OPTIONS + spec.nvrtc_options())
    opts += [f"-arch={arch}", "--ptxas-options=-v"]
    opts += [f"-I{inc}" for inc in _cuda_include_dirs()]
    return opts


class _NvrtcFailure(Exception):
    def __init__(self, log: str):
        super().__init__("NVRTC compilation failed")
        self.log = log


def _nvrtc_compile(source: str, program_name: str, name_expression: str,
                   options: List[str]) -> Tuple[bytes, str, str]:
    """One NVRTC compilation: (cubin, lowered name, log); _NvrtcFailure carrying the log on
    failure. Every compile of this module goes through here."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram(source, program_name, [], [])
    try:
        nvrtc.addNameExpression(prog, name_expression)
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError:
            raise _NvrtcFailure(nvrtc.getProgramLog(prog)) from None
        log = nvrtc.getProgramLog(prog)
        lowered = nvrtc.getLoweredName(prog, name_expression)
        # CuPy's getCUBIN drops the image's last byte (it strips a C-string terminator that a
        # cubin does not have); the driver loads it anyway, but ELF tools reject it. Restore it.
        cubin = bytes(nvrtc.getCUBIN(prog)) + b"\0"
        return cubin, str(lowered), str(log)
    finally:
        nvrtc.destroyProgram(prog)


def _compile(spec: KernelSpec, arch: str) -> Tuple[bytes, str, str]:
    try:
        return _nvrtc_compile(read_source(spec.source), spec.source, spec.name,
                              compile_options(spec, arch))
    except _NvrtcFailure as e:
        raise KernelCompileError(spec, e.log, spec.compile_arch(arch)) from None


def compile_only(spec: KernelSpec, arch: str = "sm_80") -> str:
    """Compile `spec` to a cubin with NVRTC, no GPU and no cache; returns the log (registers,
    spills from ptxas). Hopper specs always compile for sm_90a.

    Raises KernelCompileError with NVRTC's log on failure.
    """
    _cubin, _lowered, log = _compile(spec, arch)
    return log


# ----------------------------------------------------------------------------------------------
# the disk cache
# ----------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    """$CUPY_COSINE_ATTN_CACHE_DIR, else $XDG_CACHE_HOME/cupy-cosine-attn, else
    ~/.cache/cupy-cosine-attn."""
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "cupy-cosine-attn"


def cache_key(spec: KernelSpec, arch: str) -> str:
    """sha256 (hex) over the cache format, package and NVRTC versions, target arch, source file
    name, every byte of the inlined source, the instantiation name and every option."""
    arch = spec.compile_arch(arch)
    fields = ["cupy-cosine-attn kernel cache", CACHE_FORMAT, _package_version(),
              list(_nvrtc_version()), arch, spec.source, spec.name, spec.is_hopper,
              list(spec.options),
              compile_options(spec, arch), read_source(spec.source)]
    return hashlib.sha256(json.dumps(fields).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CompiledKernel:
    """A cubin and what is needed to load it; `path` is None when it is not in the disk cache."""
    spec: KernelSpec
    arch: str
    key: str
    cubin: bytes
    lowered_name: str
    log: str
    path: Optional[Path]
    compiled: bool            # True: NVRTC ran in this call; False: read from the disk cache


def _entry_path(directory: Path, key: str) -> Path:
    return directory / f"{key}{ENTRY_SUFFIX}"


def _pack(meta: dict, cubin: bytes) -> bytes:
    mbytes = json.dumps(meta, sort_keys=True).encode("utf-8")
    digest = hashlib.sha256(mbytes + cubin).digest()
    return _HEADER.pack(_MAGIC, CACHE_FORMAT, len(mbytes), len(cubin), digest) + mbytes + cubin


def _unpack(data: bytes) -> Tuple[dict, bytes]:
    if len(data) < _HEADER.size:
        raise CacheCorruptError(f"short file ({len(data)} bytes)")
    magic, fmt, mlen, clen, digest = _HEADER.unpack_from(data)
    if magic != _MAGIC:
        raise CacheCorruptError("bad magic")
    if fmt != CACHE_FORMAT:
        raise CacheCorruptError(f"cache format {fmt}, expected {CACHE_FORMAT}")
    payload = data[_HEADER.size:]
    if len(payload) != mlen + clen:
        raise CacheCorruptError(f"payload is {len(payload)} bytes, header says {mlen + clen}")
    if hashlib.sha256(payload).digest() != digest:
        raise CacheCorruptError("checksum mismatch")
    try:
        meta = json.loads(payload[:mlen].decode("utf-8"))
    except ValueError as e:
        raise CacheCorruptError(f"unreadable metadata: {e}") from None
    cubin = payload[mlen:]
    if not isinstance(meta, dict) or not isinstance(meta.get("lowered_name"), str) or not cubin:
        raise CacheCorruptError("incomplete metadata or empty cubin")
    return meta, cubin


def read_entry(path: Union[str, Path], expected_key: Optional[str] = None) -> Tuple[dict, bytes]:
    """(metadata, cubin) of a cache file; CacheCorruptError if any check fails (also when its
    key is not `expected_key`); OSError if it cannot be read."""
    data = Path(path).read_bytes()
    meta, cubin = _unpack(data)
    if expected_key is not None and meta.get("key") != expected_key:
        raise CacheCorruptError("entry holds another key")
    return meta, cubin


def _discard(path: Path, st) -> None:
    """Delete a bad entry, unless another process has meanwhile renamed a new file over it."""
    try:
        now = os.stat(path)
        if st is None or (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev):
            os.unlink(path)
    except OSError:
        pass


def _load_entry(spec: KernelSpec, arch: str, key: str, directory: Path) -> Optional[CompiledKernel]:
    path = _entry_path(directory, key)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError:           # missing, or unreadable: a miss
        return None
    try:
        meta, cubin = _unpack(data)
        if meta.get("key") != key:
            raise CacheCorruptError("entry holds another key")
    except CacheCorruptError as e:
        warnings.warn(f"cupy-cosine-attn: discarding a bad kernel cache file {path} ({e}); "
                      "recompiling", RuntimeWarning, stacklevel=3)
        _discard(path, st)
        return None
    return CompiledKernel(spec, arch, key, cubin, meta["lowered_name"], meta.get("log", ""),
                          path, compiled=False)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _store(directory: Path, key: str, data: bytes) -> Path:
    """Write `data` as the entry of `key`: temp file in the same directory, fsync, os.replace."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{key[:16]}-", suffix=".part",
                               dir=str(directory))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        final = _entry_path(directory, key)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    _sweep_stale_temps(directory)
    return final


def _sweep_stale_temps(directory: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp files that a killed process left behind (an hour old: no writer is alive)."""
    cutoff = time.time() - max_age_s
    try:
        with os.scandir(directory) as it:
            for e in it:
                if e.name.startswith(_TMP_PREFIX):
                    with contextlib.suppress(OSError):
                        if e.stat().st_mtime < cutoff:
                            os.unlink(e.path)
    except OSError:
        pass


@contextlib.contextmanager
def _key_lock(directory: Path, key: str):
    """Exclusive fcntl lock for `key` across processes (256 lock files, by key prefix). Falls
    through without a lock where locking is impossible (no fcntl, unwritable directory, NFS
    without locks) or after _LOCK_TIMEOUT_S."""
    if fcntl is None or not _USE_LOCK:
        yield
        return
    try:
        lock_dir = directory / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / f"{key[:2]}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    locked = False
    try:
        deadline = time.monotonic() + _LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.02)
        yield
    finally:
        if locked:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_WARNED_DIRS = set()
_WARN_LOCK = threading.Lock()


def _warn_unwritable(directory: Path, err: BaseException) -> None:
    with _WARN_LOCK:
        if str(directory) in _WARNED_DIRS:
            return
        _WARNED_DIRS.add(str(directory))
    warnings.warn(f"cupy-cosine-attn: kernel cache directory {directory} is not writable "
                  f"({err}); compiling in memory (set {CACHE_DIR_ENV} to a writable directory "
                  "to keep compiled kernels)", RuntimeWarning, stacklevel=4)


def compile_cubin(spec: KernelSpec, arch: str) -> CompiledKernel:
    """The cubin of `spec` for `arch` (Hopper specs: sm_90a), from the disk cache or compiled and
    stored there; compiled in memory when the cache directory is not writable. No GPU needed.

    Raises KernelCompileError with NVRTC's log on failure.
    """
    arch = spec.compile_arch(arch)
    key = cache_key(spec, arch)
    directory = cache_dir()
    hit = _load_entry(spec, arch, key, directory)
    if hit is not None:
        return hit
    with _key_lock(directory, key):
        hit = _load_entry(spec, arch, key, directory)     # another process may have finished
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        cubin, lowered, log = _compile(spec, arch)
        seconds = time.perf_counter() - t0
        meta = {"key": key, "format": CACHE_FORMAT, "lowered_name": lowered, "arch": arch,
                "spec": spec.as_dict(), "options": compile_options(spec, arch),
                "nvrtc": ".".join(map(str, _nvrtc_version())), "package": _package_version(),
                "log": log, "compile_seconds": round(seconds, 4), "created": time.time()}
        try:
            path = _store(directory, key, _pack(meta, cubin))
        except OSError as e:
            _warn_unwritable(directory, e)
            path = None
    return CompiledKernel(spec, arch, key, cubin, lowered, log, path, compiled=True)


def compile_to_cache(spec: KernelSpec, arch: str) -> Optional[Path]:
    """Make sure the disk cache holds `spec` for `arch` (compiling it if needed; no GPU needed)
    and return the entry's path; None (after a warning) when the cache directory is not
    writable."""
    return compile_cubin(spec, arch).path


def lookup(spec: KernelSpec, arch: str) -> Optional[Path]:
    """The path of a valid cache entry of `spec` for `arch`, or None (never compiles)."""
    arch = spec.compile_arch(arch)
    hit = _load_entry(spec, arch, cache_key(spec, arch), cache_dir())
    return hit.path if hit else None


def cache_entries(directory: Optional[Union[str, Path]] = None) -> List[Path]:
    """Entry files in the cache directory (not validated)."""
    d = Path(directory) if directory is not None else cache_dir()
    try:
        return sorted(p for p in d.iterdir() if p.name.endswith(ENTRY_SUFFIX) and p.is_file())
    except OSError:
        return []


def cache_stats(directory: Optional[Union[str, Path]] = None) -> dict:
    """{'dir', 'entries', 'bytes', 'temp_files'} of the cache directory."""
    d = Path(directory) if directory is not None else cache_dir()
    entries = cache_entries(d)
    size = 0
    for p in entries:
        with contextlib.suppress(OSError):
            size += p.stat().st_size
    try:
        temps = sum(1 for p in d.iterdir() if p.name.startswith(_TMP_PREFIX))
    except OSError:
        temps = 0
    return {"dir": str(d), "entries": len(entries), "bytes": size, "temp_files": temps}


def clear_cache(directory: Optional[Union[str, Path]] = None) -> int:
    """Delete every entry and leftover temp file; returns how many entries were deleted."""
    d = Path(directory) if directory is not None else cache_dir()
    n = 0
    try:
        names = list(d.iterdir())
    except OSError:
        return 0
    for p in names:
        if p.name.endswith(ENTRY_SUFFIX) or p.name.startswith(_TMP_PREFIX):
            try:
                p.unlink()
                n += p.name.endswith(ENTRY_SUFFIX)
            except OSError:
                pass
    return n


# ----------------------------------------------------------------------------------------------
# loading on the GPU
# ----------------------------------------------------------------------------------------------

def _driver():
    from cupy_backends.cuda.api import driver
    return driver


class CubinKernel:
    """A kernel loaded from a cubin for one device, called like `cupy.RawKernel`:
    `kernel(grid, block, args, shared_mem=0, stream=None)`; `max_dynamic_shared_size_bytes` and
    `preferred_shared_memory_carveout` can be set, the other RawKernel attributes read."""

    def __init__(self, function, spec: KernelSpec, arch: str, lowered_name: str, log: str = "",
                 path: Optional[Path] = None):
        self.kernel = function               # cupy.cuda.function.Function (keeps its module)
        self.spec, self.arch, self.lowered_name, self.log, self.path = (
            spec, arch, lowered_name, log, path)
        self.name = self.__name__ = spec.name

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None):
        self.kernel(tuple(grid), tuple(block), args, shared_mem, stream)

    def __repr__(self):
        return f"<CubinKernel {self.spec.name} ({self.spec.source}, {self.arch})>"

    def _get(self, attr: str) -> int:
        d = _driver()
        return d.funcGetAttribute(getattr(d, "CU_FUNC_ATTRIBUTE_" + attr), self.kernel.ptr)

    def _set(self, attr: str, value: int) -> None:
        d = _driver()
        d.funcSetAttribute(self.kernel.ptr, getattr(d, "CU_FUNC_ATTRIBUTE_" + attr), int(value))

    max_dynamic_shared_size_bytes = property(
        lambda self: self._get("MAX_DYNAMIC_SHARED_SIZE_BYTES"),
        lambda self, v: self._set("MAX_DYNAMIC_SHARED_SIZE_BYTES", v))
    preferred_shared_memory_carveout = property(
        lambda self: self._get("PREFERRED_SHARED_MEMORY_CARVEOUT"),
        lambda self, v: self._set("PREFERRED_SHARED_MEMORY_CARVEOUT", v))
    max_threads_per_block = property(lambda self: self._get("MAX_THREADS_PER_BLOCK"))
    shared_size_bytes = property(lambda self: self._get("SHARED_SIZE_BYTES"))
    const_size_bytes = property(lambda self: self._get("CONST_SIZE_BYTES"))
    local_size_bytes = property(lambda self: self._get("LOCAL_SIZE_BYTES"))
    num_regs = property(lambda self: self._get("NUM_REGS"))
    ptx_version = property(lambda self: self._get("PTX_VERSION"))
    binary_version = property(lambda self: self._get("BINARY_VERSION"))

    @property
    def attributes(self) -> dict:
        names = ("max_threads_per_block", "shared_size_bytes", "const_size_bytes",
                 "local_size_bytes", "num_regs", "ptx_version", "binary_version",
                 "max_dynamic_shared_size_bytes", "preferred_shared_memory_carveout")
        return {n: getattr(self, n) for n in names}


def _current_device() -> Tuple[int, str]:
    import cupy
    dev = cupy.cuda.Device()
    return dev.id, dev.compute_capability


def _current_device_id() -> int:
    import cupy
    return cupy.cuda.Device().id


def _load_module(cubin: bytes):
    """Load a cubin into the current device's context."""
    from cupy.cuda import function
    module = function.Module()
    module.load(cubin)
    return module


@functools.lru_cache(maxsize=None)
def _supported_archs() -> Tuple[int, ...]:
    try:
        from cupy.cuda import nvrtc
        return tuple(int(a) for a in nvrtc.getSupportedArchs())
    except Exception:  # pragma: no cover - old NVRTC
        return ()


def device_arch(spec: KernelSpec, compute_capability) -> str:
    """spec.arch_for(cc), lowered to the newest arch of the same major version that NVRTC can
    target when it cannot target the device's own (a cubin runs on later minor versions)."""
    arch = spec.arch_for(compute_capability)
    if spec.is_hopper:
        return arch
    cc = int(normalize_compute_capability(compute_capability))
    supported = _supported_archs()
    if supported and cc not in supported:
        same_major = [a for a in supported if a // 10 == cc // 10 and a <= cc]
        if same_major:
            return f"sm_{max(same_major)}"
    return arch


_LOADED: Dict[Tuple[int, KernelSpec], CubinKernel] = {}
_LOADING_LOCKS: Dict[Tuple[int, KernelSpec], threading.Lock] = {}
_LOADED_LOCK = threading.Lock()


def get_function(spec: KernelSpec) -> CubinKernel:
    """The kernel of `spec` for the current CuPy device, loaded from the disk cache (compiled
    there first if needed); memoised per (device, spec) in the process, thread-safe.

    Raises RuntimeError for a Hopper spec on a device other than compute capability 9.0 and
    KernelCompileError when NVRTC rejects the source.
    """
    memo_key = (_current_device_id(), spec)
    fn = _LOADED.get(memo_key)
    if fn is not None:
        return fn
    with _LOADED_LOCK:
        lock = _LOADING_LOCKS.setdefault(memo_key, threading.Lock())
    with lock:
        fn = _LOADED.get(memo_key)
        if fn is None:
            _dev_id, cc = _current_device()
            arch = device_arch(spec, cc)
            built = compile_cubin(spec, arch)
            module = _load_module(built.cubin)
            fn = CubinKernel(module.get_function(built.lowered_name), spec, built.arch,
                             built.lowered_name, built.log, built.path)
            _LOADED[memo_key] = fn
    return fn


def _forget_loaded() -> None:
    """Drop the in-process memo (tests)."""
    with _LOADED_LOCK:
        _LOADED.clear()
        _LOADING_LOCKS.clear()
