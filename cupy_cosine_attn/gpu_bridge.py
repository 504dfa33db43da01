"""Moves a GPU call between its caller's framework and the CuPy-launched kernels, zero-copy.

torch CUDA tensors travel through DLPack (bfloat16 as a same-size int16 view, since CuPy may lack
the dtype; kernels take the dtype from the Problem, never from the arrays). Outputs are allocated
by the caller's framework (torch's caching allocator for torch) and written in place by the
kernels, which run on the caller's current stream and device.

For torch callers every temporary of gpu_launch comes from torch's caching allocator too
(`_TorchWorkspace`): one allocator per torch program, and under CUDA-graph capture
(`torch.cuda.graph`, `torch.compile(mode="reduce-overhead")`) the graph's private memory pool,
which keeps the captured kernels' memory valid for every replay. CuPy's thread-local allocator
points at the same torch allocator for the duration of the call, so nothing CuPy allocates
internally (reductions, copies) lands in CuPy's pool either. CuPy callers keep CuPy's pool and
CuPy's current stream.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import replace

import numpy as np

from .gpu_launch import Workspace
from .problem import Problem


def _cupy():
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError(
            "GPU inputs need CuPy: pip install 'cupy-cosine-attn[cuda12]' (or [cuda13])") from e
    return cupy


def _device_index(problem):
    return int(problem.device.split(":")[1])


class _TorchCapsule:
    """A torch tensor's DLPack capsule (torch.utils.dlpack.to_dlpack) for cupy.from_dlpack,
    without torch.Tensor.__dlpack__'s Python-side stream handling (tens of microseconds per
    tensor). That handling only orders the producer's stream before the consumer's; every
    conversion here runs inside _on_callers_stream, where both are the caller's current stream,
    so there is nothing to order."""
    __slots__ = ("tensor",)

    def __init__(self, tensor):
        self.tensor = tensor

    def __dlpack__(self, stream=None, **kwargs):
        from torch.utils.dlpack import to_dlpack
        return to_dlpack(self.tensor)

    def __dlpack_device__(self):
        return (2, self.tensor.device.index)      # kDLCUDA, device index


def _as_cupy(x):
    """A CuPy view of a torch CUDA tensor or CuPy array (None passes through); torch tensors are
    converted on the caller's current stream (inside _on_callers_stream)."""
    if x is None or type(x).__module__.split(".")[0] == "cupy":
        return x
    import torch
    t = x.detach()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return _cupy().from_dlpack(_TorchCapsule(t))


class _TorchWorkspace(Workspace):
    """gpu_launch temporaries from torch's caching allocator, on one device.

    torch.empty allocates on the device's current stream, the stream the kernels are launched
    on (the caller's current stream). Each CuPy array owns its torch tensor (UnownedMemory's
    owner), so the memory returns to torch when the array dies, after the kernels using it were
    enqueued on that stream: the caching allocator reuses it only for work ordered after them.
    During a graph capture torch.empty serves the capture's private pool.
    """

    def __init__(self, torch, cupy, index):
        self._torch, self._cupy, self._index = torch, cupy, index
        self._device = torch.device("cuda", index)

    def malloc(self, nbytes):
        """nbytes of device memory as a cupy MemoryPointer (also CuPy's allocator in a call)."""
        t = self._torch.empty((int(nbytes),), dtype=self._torch.uint8, device=self._device)
        mem = self._cupy.cuda.UnownedMemory(t.data_ptr(), int(nbytes), t, self._index)
        return self._cupy.cuda.MemoryPointer(mem, 0)

    def empty(self, shape, dtype):
        shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(map(int, shape))
        dtype = np.dtype(dtype)
        return self._cupy.ndarray(shape, dtype=dtype,
                                  memptr=self.malloc(math.prod(shape) * dtype.itemsize))

    def capturing(self):
        return bool(self._torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def _on_callers_stream(problem):
    """Run on the caller's device and current stream (looked up per call: graph capture moves it),
    with temporaries from the caller's allocator."""
    cupy = _cupy()
    idx = _device_index(problem)
    if problem.kind != "torch":
        with cupy.cuda.Device(idx):       # CuPy's current stream of that device
            yield
        return
    import torch
    from .gpu_launch import using_workspace
    ws = _TorchWorkspace(torch, cupy, idx)
    on_device = torch.cuda.current_device() == idx
    with (contextlib.nullcontext() if on_device else torch.cuda.device(idx)), cupy.cuda.Device(idx), \
            _external_stream(cupy, torch.cuda.current_stream(idx), idx), \
            cupy.cuda.using_allocator(ws.malloc), using_workspace(ws):
        yield


_STREAMS = {}     # (device, stream handle) -> CuPy's view of that torch stream


def _external_stream(cupy, torch_stream, idx):
    """CuPy view of torch's stream (Stream.from_external in CuPy 14; ExternalStream before),
    made once per stream handle: a view holds only the handle, so it stays valid for a stream
    created later at the same address (CuPy keeps its stream stack per thread, so one view may
    be entered from several threads)."""
    key = (idx, torch_stream.cuda_stream)
    view = _STREAMS.get(key)
    if view is None:
        if len(_STREAMS) >= 64:           # programs cycling through many streams
            _STREAMS.clear()
        view = _STREAMS[key] = _make_external_stream(cupy, torch_stream, idx)
    return view


def _make_external_stream(cupy, torch_stream, idx):
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        try:
            return from_external(torch_stream)
        except (TypeError, AttributeError):   # torch without the __cuda_stream__ protocol
            pass
    return cupy.cuda.ExternalStream(torch_stream.cuda_stream, idx)


def _empty(problem, shape, dtype_name):
    """Uninitialised output on the problem's device; NaN-filled when CUPY_COSINE_ATTN_POISON=1
    (tests: every element must be written by the kernels)."""
    poison = os.environ.get("CUPY_COSINE_ATTN_POISON") == "1"
    if problem.kind == "torch":
        import torch
        x = torch.empty(shape, dtype=getattr(torch, dtype_name), device=problem.device)
        if poison:
            x.fill_(float("nan"))
        return x
    cupy = _cupy()
    with cupy.cuda.Device(_device_index(problem)):
        x = cupy.empty(shape, dtype=cupy.dtype(dtype_name) if dtype_name != "bfloat16"
                       else problem.q.dtype)
        if poison:
            x.fill(float("nan"))
    return x


def _contiguous(x):
    return x.contiguous() if hasattr(x, "contiguous") else _cupy().ascontiguousarray(x)


def _cupy_problem(problem: Problem) -> Problem:
    return replace(problem, kind="cupy", q=_as_cupy(problem.q), k=_as_cupy(problem.k),
                   v=_as_cupy(problem.v), mask=_as_cupy(problem.mask), bias=_as_cupy(problem.bias))


def forward(problem: Problem, keep_normalised=False):
    """(out, lse) in the caller's framework and layout.

    keep_normalised: return (out, lse, normalised) instead, normalised being (qhat, rq, khat, rk)
    when the forward normalised q and k (qhat, khat in the caller's q and k shapes, contiguous;
    rq, rk float32 inverse norms, a row per query or key and a column per group) or None: what
    `backward(..., normalised=(rq, rk))` takes on a problem made from qhat and khat, instead of
    normalising q and k again."""
    from .gpu_launch import gpu_forward, keeps_normalised
    b, h, hk, i, j, d = problem.dims
    out = _empty(problem, problem.q_shape, problem.dtype)
    lse = _empty(problem, problem.lse_shape, "float32")
    kept = None
    if keep_normalised and keeps_normalised(problem):
        kept = (_empty(problem, problem.q_shape, problem.dtype),
                _empty(problem, (b * h * i, problem.groups), "float32"),
                _empty(problem, problem.k_shape, problem.dtype),
                _empty(problem, (b * hk * j, problem.groups), "float32"))
    if math.prod(problem.q_shape) or math.prod(problem.lse_shape):
        with _on_callers_stream(problem):
            keep = None
            if kept is not None:
                keep = (_as_cupy(kept[0]).reshape(b, h, i, d), _as_cupy(kept[1]),
                        _as_cupy(kept[2]).reshape(b, hk, j, d), _as_cupy(kept[3]))
            gpu_forward(_cupy_problem(problem), _as_cupy(out).reshape(b, h, i, d),
                        _as_cupy(lse).reshape(b, h, i), keep)
    return (out, lse, kept) if keep_normalised else (out, lse)


def backward(problem: Problem, dout, out, lse, deterministic=False, normalised=None):
    """(dq, dk, dv, dbias) in the caller's framework and shapes; normalised: (rq, rk) of
    forward(keep_normalised=True) when problem's q and k are its qhat and khat."""
    b, h, hk, i, j, d = problem.dims
    dq = _empty(problem, problem.q_shape, problem.dtype)
    dk = _empty(problem, problem.k_shape, problem.dtype)
    dv = _empty(problem, problem.k_shape, problem.dtype)
    dbias = None
    if problem.bias is not None:
        dbias = _empty(problem, problem.bias_shape, problem.dtype)
    from .gpu_launch import gpu_backward
    with _on_callers_stream(problem):
        canon_bias = None if dbias is None else _as_cupy(dbias).reshape(problem.bias.shape)
        gpu_backward(_cupy_problem(problem),
                     _as_cupy(_contiguous(dout)).reshape(b, h, i, d),
                     _as_cupy(_contiguous(out)).reshape(b, h, i, d),
                     _as_cupy(_contiguous(lse)).reshape(b, h, i),
                     _as_cupy(dq).reshape(b, h, i, d), _as_cupy(dk).reshape(b, hk, j, d),
                     _as_cupy(dv).reshape(b, hk, j, d), canon_bias,
                     deterministic=deterministic,
                     normalised=None if normalised is None else tuple(map(_as_cupy, normalised)))
    return dq, dk, dv, dbias
