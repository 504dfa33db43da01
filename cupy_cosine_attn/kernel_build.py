"""How kernels are compiled and cached, kept apart from what is compiled (KernelSpec) and from
the ops that launch them.

A spec names a source file in `kernels/`, one template instantiation and extra options. Local
`#include "x.cuh"` lines are inlined, so the source string CuPy hashes for its disk cache covers
every byte of every header (CuPy's own key ignores `-I` headers). Compiled functions are memoised
per device in the process; CuPy's disk cache (CUPY_CACHE_DIR, default ~/.cupy/kernel_cache) keeps
them across processes.
"""
from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from ._version import __version__

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


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


@dataclass(frozen=True)
class KernelSpec:
    """One compiled variant: source file, template instantiation, extra NVRTC options."""
    source: str
    name: str
    options: Tuple[str, ...] = ()

    def key(self) -> str:
        text = read_source(self.source)
        return hashlib.sha256("\0".join((text, self.name, *self.options)).encode()).hexdigest()


class KernelCompileError(RuntimeError):
    """NVRTC rejected a variant; carries the spec and the compiler log."""

    def __init__(self, spec: KernelSpec, log: str):
        super().__init__(f"compiling {spec.name} from {spec.source} "
                         f"(options {list(spec.options)}) failed:\n{log}")
        self.spec, self.log = spec, log


BASE_OPTIONS = ("-std=c++17",)


@functools.lru_cache(maxsize=None)
def _compiled(device_id: int, spec: KernelSpec):
    import cupy
    with cupy.cuda.Device(device_id):
        module = cupy.RawModule(code=read_source(spec.source),
                                options=BASE_OPTIONS + spec.options, name_expressions=[spec.name])
        try:
            return module.get_function(spec.name)
        except cupy.cuda.compiler.CompileException as e:
            raise KernelCompileError(spec, str(e)) from None


def get_function(spec: KernelSpec):
    """The compiled kernel of `spec` for the current device (compiled once per process)."""
    import cupy
    return _compiled(cupy.cuda.Device().id, spec)


def compile_only(spec: KernelSpec, arch: str = "sm_80") -> str:
    """Compile `spec` to a cubin with NVRTC, no GPU needed; returns the log (registers, spills).

    Raises KernelCompileError with NVRTC's log on failure.
    """
    from cupy.cuda import nvrtc
    opts = list(BASE_OPTIONS + spec.options)
    opts += [f"-arch={arch}", "--ptxas-options=-v"]
    for inc in _cuda_include_dirs():
        opts.append(f"-I{inc}")
    prog = nvrtc.createProgram(read_source(spec.source), spec.source, [], [])
    try:
        nvrtc.addNameExpression(prog, spec.name)
        try:
            nvrtc.compileProgram(prog, opts)
        except nvrtc.NVRTCError:
            raise KernelCompileError(spec, nvrtc.getProgramLog(prog)) from None
        return nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)


def _cuda_include_dirs():
    try:
        from cuda import pathfinder
        found = pathfinder.find_nvidia_header_directory("cudart")
        return [found] if found else []
    except Exception:  # pragma: no cover - depends on the installation
        return []
