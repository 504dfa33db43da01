"""The GPU integration logic that runs without a GPU: the workspace hook, the capture-time
choice of the softmax variant (no host read-back while capturing), first-use errors inside a
capture, the torch-backed workspace and the bridge's per-call context, with fakes for CuPy/torch.
"""
import ast
import contextlib
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cupy_cosine_attn import gpu_launch
from cupy_cosine_attn.kernel_build import KernelCompileError, KernelSpec
from cupy_cosine_attn.problem import logit_bound, make_problem, softmax_shift

ROOT = Path(__file__).resolve().parent.parent


class FakeWorkspace(gpu_launch.Workspace):
    def __init__(self, capturing):
        self._capturing = capturing
        self.queries = 0

    def empty(self, shape, dtype):      # pragma: no cover - must not be reached
        raise AssertionError("no temporaries expected")

    def capturing(self):
        self.queries += 1
        return self._capturing


def _problem(bias=False, l2norm=True, dtype="float16", scale=8.0, groups=1):
    r = np.random.default_rng(0)
    q = r.standard_normal((1, 2, 5, 16)).astype(dtype)
    b = r.standard_normal((2, 5, 5)).astype(dtype) if bias else None
    # NumPy arrays: any device work (normalise, read back) would fail on them
    return make_problem(q, q, q, attn_bias=b, scale=scale, groups=groups, l2norm_qk=l2norm)


# ---------------------------------------------------------------------------------------------
# the softmax variant during a capture
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias,l2norm", [(True, True), (False, False), (True, False)])
def test_capture_takes_the_online_variant_when_the_shift_needs_data(bias, l2norm):
    p = _problem(bias=bias, l2norm=l2norm)
    assert gpu_launch.shift_needs_data(p)
    ws = FakeWorkspace(capturing=True)
    with gpu_launch.using_workspace(ws):
        assert gpu_launch.choose_shift(p, p.q, p.k) is None
    assert ws.queries == 1


@pytest.mark.parametrize("capturing", [False, True])
@pytest.mark.parametrize("dtype,scale,groups", [("float16", 8.0, 1), ("float16", 8.0, 2),
                                                ("float32", 16.0, 8)])
def test_shift_without_data_is_the_same_in_and_out_of_capture(capturing, dtype, scale, groups):
    p = _problem(dtype=dtype, scale=scale, groups=groups)
    assert not gpu_launch.shift_needs_data(p)
    p_dtype = "float16" if dtype == "float16" else "float32"
    with gpu_launch.using_workspace(FakeWorkspace(capturing)):
        got = gpu_launch.choose_shift(p, p.q, p.k)
    assert got == softmax_shift(logit_bound(p), 0.0, 0.0, p_dtype)


def test_empty_bias_needs_no_data():
    q = np.zeros((1, 1, 0, 16), np.float16)
    k = np.zeros((1, 1, 3, 16), np.float16)
    p = make_problem(q, k, k, attn_bias=np.zeros((1, 0, 3), np.float16))
    assert not gpu_launch.shift_needs_data(p)


# ---------------------------------------------------------------------------------------------
# workspace hook
# ---------------------------------------------------------------------------------------------

def test_workspace_default_nesting_and_threads():
    default = gpu_launch.workspace()
    assert isinstance(default, gpu_launch.CupyWorkspace) and default.keep is None
    a, b = FakeWorkspace(False), FakeWorkspace(True)
    seen = []
    with gpu_launch.using_workspace(a):
        assert gpu_launch.workspace() is a
        with gpu_launch.using_workspace(b):
            assert gpu_launch.workspace() is b
            t = threading.Thread(target=lambda: seen.append(gpu_launch.workspace()))
            t.start()
            t.join()
        assert gpu_launch.workspace() is a
    assert gpu_launch.workspace() is default
    assert seen == [default], "another thread must not see this call's workspace"
    with pytest.raises(KeyError):
        with gpu_launch.using_workspace(a):
            raise KeyError("x")
    assert gpu_launch.workspace() is default


def test_workspace_zeros_is_empty_then_fill():
    filled = []

    class Arr:
        def fill(self, v):
            filled.append(v)

    class WS(gpu_launch.Workspace):
        def empty(self, shape, dtype):
            assert shape == (2, 3) and dtype == np.float32
            return Arr()

    WS().zeros((2, 3), np.float32)
    assert filled == [0]


def test_stream_is_capturing():
    yes = SimpleNamespace(is_capturing=lambda: True)
    no = SimpleNamespace(is_capturing=lambda: False)

    def refuse():
        raise RuntimeError("cudaErrorStreamCaptureImplicit")

    assert gpu_launch.stream_is_capturing(yes) is True
    assert gpu_launch.stream_is_capturing(no) is False
    assert gpu_launch.stream_is_capturing(SimpleNamespace(is_capturing=refuse)) is True


# ---------------------------------------------------------------------------------------------
# first use of a kernel inside a capture
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def fake_device(monkeypatch):
    fake = SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(getDevice=lambda: 7)))
    monkeypatch.setattr(gpu_launch, "_cp", lambda: fake)
    monkeypatch.setattr(gpu_launch, "_READY", set())
    return fake


def test_first_use_failure_inside_capture_says_what_to_do(fake_device):
    def load():
        raise RuntimeError("CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED")

    with gpu_launch.using_workspace(FakeWorkspace(True)):
        with pytest.raises(RuntimeError, match="first time inside a CUDA graph capture and failed") as e:
            gpu_launch._first_use("kernel k", "k", load)
    assert "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED" in str(e.value)
    assert "warm-up" in str(e.value) and "12.3" in str(e.value)
    assert isinstance(e.value.__cause__, RuntimeError)
    assert not gpu_launch._READY


def test_first_use_outside_capture_and_compile_errors_pass_through(fake_device):
    err = RuntimeError("plain launch failure")

    def fail():
        raise err

    with gpu_launch.using_workspace(FakeWorkspace(False)):
        with pytest.raises(RuntimeError) as e:
            gpu_launch._first_use("kernel k", "k", fail)
    assert e.value is err
    spec = KernelSpec("prep.cu", "row_dot<__half>")
    compile_error = KernelCompileError(spec, "log")

    def bad_source():
        raise compile_error

    with gpu_launch.using_workspace(FakeWorkspace(True)):
        with pytest.raises(KernelCompileError) as e:
            gpu_launch._first_use("kernel k", spec, bad_source)
    assert e.value is compile_error


def test_first_use_is_remembered_per_device(fake_device):
    ws = FakeWorkspace(True)
    calls = []
    with gpu_launch.using_workspace(ws):
        assert gpu_launch._first_use("k", "key", lambda: calls.append(1) or 5) == 5
        assert gpu_launch._first_use("k", "key", lambda: calls.append(2) or 6) == 6
    assert calls == [1, 2] and ws.queries == 1
    assert (7, "key") in gpu_launch._READY
    fake_device.cuda.runtime.getDevice = lambda: 3
    with gpu_launch.using_workspace(ws):
        gpu_launch._first_use("k", "key", lambda: None)
    assert ws.queries == 2


# ---------------------------------------------------------------------------------------------
# sources: no allocation or synchronisation outside the hooks
# ---------------------------------------------------------------------------------------------

def _calls(path):
    """(enclosing function, call text) of every call in a module."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, where):
        for child in ast.iter_child_nodes(node):
            name = where
            if isinstance(child, (ast.FunctionDef, ast.ClassDef)):
                name = f"{where}.{child.name}" if where else child.name
            if isinstance(child, ast.Call):
                out.append((name, ast.unparse(child.func), len(child.args) + len(child.keywords)))
            visit(child, name)

    visit(tree, "")
    return out


CUPY_ALLOC = ("empty", "zeros", "empty_like", "zeros_like", "ascontiguousarray", "ones",
              "full", "array", "asarray", "copy")


def test_gpu_launch_takes_temporaries_only_from_the_workspace():
    bad = []
    for where, func, _ in _calls(ROOT / "cupy_cosine_attn" / "gpu_launch.py"):
        base, _, attr = func.rpartition(".")
        if attr in CUPY_ALLOC and base in ("cp", "_cp()", "cupy"):
            if where != "CupyWorkspace.empty":
                bad.append((where, func))
    assert not bad, f"CuPy allocations outside the workspace: {bad}"


def test_gpu_launch_reads_back_only_for_the_shift():
    syncs = ("get", "item", "nonzero", "asnumpy", "synchronize", "tolist")
    found = []
    for where, func, nargs in _calls(ROOT / "cupy_cosine_attn" / "gpu_launch.py"):
        attr = func.rpartition(".")[2]
        host_only = func == "_WORKSPACE.get" or (attr == "get" and nargs)   # ContextVar, dict
        if attr in syncs and not host_only:
            found.append((where, func))
        if func in ("float", "int", "bool") and where not in ("stream_is_capturing",
                                                              "_device_stats", "fwd_warps"):
            found.append((where, func))
    assert {w for w, _ in found} <= {"_device_stats", "stream_is_capturing"}, found
    # gpu_backward never reads back (no shift there)
    assert not [f for f in found if f[0].startswith("gpu_backward")]


def test_cupy_reductions_only_for_the_shift():
    """CuPy reductions may take scratch memory from CuPy's pool (CUB): only the eager shift's
    read-back uses them; the bias-gradient sum has its own kernel."""
    reductions = ("sum", "max", "min", "mean", "where", "stack", "argmax", "argmin")
    found = [(w, f) for w, f, _ in _calls(ROOT / "cupy_cosine_attn" / "gpu_launch.py")
             if f.rpartition(".")[2] in reductions and f.rpartition(".")[0] not in ("np", "")]
    assert {w for w, _ in found} <= {"_device_stats"}, found


def test_sum_broadcast_kernel_compiles():
    cupy = pytest.importorskip("cupy")
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
    except Exception:  # noqa: BLE001
        pytest.skip("NVRTC is not installed")
    prog = nvrtc.createProgram(gpu_launch.SUM_BROADCAST_SRC, "sum_broadcast.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(prog, ["-arch=sm_80", "-std=c++17"])
        except nvrtc.NVRTCError:
            pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)
    assert cupy is not None


def _sum_broadcast_model(full, bias_shape):
    """The kernel's index arithmetic, element by element, in Python."""
    b, h, i, j = full.shape
    bb, hb = bias_shape[:2]
    sum_b, sum_h = bb == 1 and b > 1, hb == 1 and h > 1
    flat = full.ravel()
    plane = i * j
    red = np.empty((bb, hb, i, j), np.float32).ravel()
    for o in range(red.size):
        pos, bh = o % plane, o // plane
        oh, ob = bh % hb, bh // hb
        b0, b1 = (0, b) if sum_b else (ob, ob + 1)
        h0, h1 = (0, h) if sum_h else (oh, oh + 1)
        acc = np.float32(0)
        for bi in range(b0, b1):
            for hi in range(h0, h1):
                acc += flat[(bi * h + hi) * plane + pos]
        red[o] = acc
    return red.reshape(bb, hb, i, j)


@pytest.mark.parametrize("b,h,bb,hb", [(3, 2, 1, 2), (3, 2, 3, 1), (2, 3, 1, 1), (1, 4, 1, 1),
                                       (3, 1, 1, 1)])
def test_sum_broadcast_index_arithmetic(b, h, bb, hb):
    full = np.random.default_rng(1).standard_normal((b, h, 3, 5)).astype(np.float32)
    want = full.sum(axis=tuple(a for a, n in ((0, bb), (1, hb)) if n == 1), keepdims=True)
    assert np.allclose(_sum_broadcast_model(full, (bb, hb)), want, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# gpu_bridge with fake CuPy / torch
# ---------------------------------------------------------------------------------------------

class _FakeCupy:
    """Records what the bridge asks of CuPy."""

    def __init__(self, log):
        self.log = log
        fake = self

        class Device:
            def __init__(self, idx):
                self.idx = idx

            def __enter__(self):
                log.append(("cupy.Device", self.idx))

            def __exit__(self, *a):
                log.append(("cupy.Device.exit", self.idx))

        class Stream:
            @staticmethod
            def from_external(s):
                log.append(("from_external", s))
                return contextlib.nullcontext()

        class UnownedMemory:
            def __init__(self, ptr, size, owner, device_id):
                self.ptr, self.size, self.owner, self.device_id = ptr, size, owner, device_id

        class MemoryPointer:
            def __init__(self, mem, offset):
                self.mem, self.offset = mem, offset

        @contextlib.contextmanager
        def using_allocator(fn):
            log.append(("using_allocator", fn))
            yield
            log.append(("using_allocator.exit",))

        def ndarray(shape, dtype, memptr):
            return SimpleNamespace(shape=shape, dtype=dtype, memptr=memptr)

        self.cuda = SimpleNamespace(Device=Device, Stream=Stream, UnownedMemory=UnownedMemory,
                                    MemoryPointer=MemoryPointer, using_allocator=using_allocator)
        self.ndarray = ndarray
        self._fake = fake


class _FakeTorch:
    uint8 = "uint8"

    def __init__(self, log, capturing=False):
        self.log = log
        self.allocated = []

        @contextlib.contextmanager
        def device(idx):
            log.append(("torch.device", idx))
            yield

        self.current = 0
        self.cuda = SimpleNamespace(
            device=device, current_device=lambda: self.current,
            current_stream=lambda idx: log.append(("current_stream", idx)) or SimpleNamespace(cuda_stream=4000 + idx),
            is_current_stream_capturing=lambda: capturing)

    def device(self, kind, index):
        return f"{kind}:{index}"

    def empty(self, shape, dtype, device):
        ptr = 4096 * (len(self.allocated) + 1)
        t = SimpleNamespace(shape=shape, dtype=dtype, device=device, data_ptr=lambda: ptr)
        self.allocated.append(t)
        return t


def test_torch_workspace_allocates_through_torch():
    from cupy_cosine_attn import gpu_bridge
    torch, cupy = _FakeTorch([], capturing=True), _FakeCupy([])
    ws = gpu_bridge._TorchWorkspace(torch, cupy, 1)
    x = ws.empty((2, 3, 5), np.float32)
    t = torch.allocated[-1]
    assert t.shape == (2 * 3 * 5 * 4,) and t.dtype == "uint8" and t.device == "cuda:1"
    assert x.shape == (2, 3, 5) and x.dtype == np.float32
    mem = x.memptr.mem
    assert mem.owner is t and mem.device_id == 1 and mem.size == 120 and mem.ptr == 4096
    y = ws.empty(7, np.int16)
    assert y.shape == (7,) and torch.allocated[-1].shape == (14,)
    z = ws.empty((0, 4), np.uint8)
    assert z.shape == (0, 4) and torch.allocated[-1].shape == (0,)
    assert ws.capturing() is True


def test_bridge_call_context_for_torch_and_cupy(monkeypatch):
    from cupy_cosine_attn import gpu_bridge
    log = []
    cupy = _FakeCupy(log)
    monkeypatch.setattr(gpu_bridge, "_cupy", lambda: cupy)
    fake_torch = _FakeTorch(log)
    import sys
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setattr(gpu_bridge, "_STREAMS", {})
    problem = SimpleNamespace(kind="torch", device="cuda:1")
    with gpu_bridge._on_callers_stream(problem):
        ws = gpu_launch.workspace()
        assert isinstance(ws, gpu_bridge._TorchWorkspace)
        inside = list(log)
    assert gpu_launch.workspace() is not ws
    kinds = [e[0] for e in inside]
    assert kinds == ["torch.device", "cupy.Device", "current_stream", "from_external",
                     "using_allocator"], kinds
    assert inside[0][1] == 1 and inside[1][1] == 1 and inside[2][1] == 1
    assert inside[3][1].cuda_stream == 4001, "must launch on torch's current stream of the device"
    assert inside[4][1] == ws.malloc, "CuPy's own allocations must go to torch too"
    assert ("using_allocator.exit",) in log and ("cupy.Device.exit", 1) in log

    # Again on the same stream, with device 1 already current: CuPy's view of the stream is
    # reused, and torch's device is not switched.
    log.clear()
    fake_torch.current = 1
    with gpu_bridge._on_callers_stream(problem):
        again = list(log)
    assert [e[0] for e in again] == ["cupy.Device", "current_stream", "using_allocator"], again

    log.clear()
    with gpu_bridge._on_callers_stream(SimpleNamespace(kind="cupy", device="cuda:2")):
        assert isinstance(gpu_launch.workspace(), gpu_launch.CupyWorkspace)
    assert log == [("cupy.Device", 2), ("cupy.Device.exit", 2)]


# ---------------------------------------------------------------------------------------------
# gpu_launch end to end on a fake CuPy: which kernels run, where temporaries come from, when the
# host reads back (kernels do not execute; NumPy arrays stand in for device arrays)
# ---------------------------------------------------------------------------------------------

class FakeDeviceArray(np.ndarray):
    reads = []          # class-level log of .get() calls

    @property
    def data(self):
        return SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def get(self):
        FakeDeviceArray.reads.append(self.shape)
        return np.asarray(self)


def _dev(x):
    return np.ascontiguousarray(x).view(FakeDeviceArray)


class FakeKernel:
    def __init__(self, log, name):
        self.log, self.name = log, name
        self.max_dynamic_shared_size_bytes = 48 * 1024

    def __call__(self, grid, block, args, shared_mem=0):
        self.log.append(("launch", self.name, grid, block, args, shared_mem))


class RecordingWorkspace(gpu_launch.Workspace):
    def __init__(self, capturing):
        self._capturing = capturing
        self.shapes = []

    def empty(self, shape, dtype):
        self.shapes.append((tuple(shape), np.dtype(dtype)))
        return _dev(np.zeros(shape, dtype))

    def capturing(self):
        return self._capturing


@pytest.fixture
def fake_gpu(monkeypatch):
    log = []
    kernels = {}

    def get_function(spec):
        log.append(("get_function", spec.name))
        return kernels.setdefault(spec, FakeKernel(log, spec.name))

    def refuse(*a, **k):
        raise AssertionError("temporary taken from CuPy's pool, not the workspace")

    fake = SimpleNamespace(
        cuda=SimpleNamespace(runtime=SimpleNamespace(getDevice=lambda: 0)),
        float32=np.float32, empty=refuse, zeros=refuse, ascontiguousarray=refuse,
        where=lambda c, a, b: _dev(np.where(c, a, b)),
        stack=lambda v: _dev(np.stack([np.asarray(x) for x in v])),
        RawKernel=lambda src, name: FakeKernel(log, name))
    monkeypatch.setattr(gpu_launch, "_cp", lambda: fake)
    monkeypatch.setattr(gpu_launch, "get_function", get_function)
    monkeypatch.setattr(gpu_launch, "_READY", set())
    monkeypatch.setattr(gpu_launch, "_SMEM_SET", {})
    monkeypatch.setattr(gpu_launch, "_SUM_BROADCAST", [])
    from cupy_cosine_attn import hopper_launch
    monkeypatch.setattr(hopper_launch, "device_is_sm90", lambda: False)
    FakeDeviceArray.reads = []
    return log


def _fake_problem(dtype="float16", bias=None, l2norm=True, b=2, h=4, i=8, j=12, d=64):
    r = np.random.default_rng(0)
    q = _dev(r.standard_normal((b, h, i, d)).astype(dtype))
    k = _dev(r.standard_normal((b, h, j, d)).astype(dtype))
    v = _dev(r.standard_normal((b, h, j, d)).astype(dtype))
    bias_arr, bbd = None, False
    if bias == "heads":
        bias_arr = _dev(r.standard_normal((h, i, j)).astype(dtype))
    elif bias == "batch":
        bias_arr, bbd = _dev(r.standard_normal((b, i, j)).astype(dtype)), True
    elif bias == "full":
        bias_arr = _dev(r.standard_normal((b, h, i, j)).astype(dtype))
    return make_problem(q, k, v, attn_bias=bias_arr, l2norm_qk=l2norm, attn_bias_batch_dim=bbd)


def _launched(log):
    return [e[1] for e in log if e[0] == "launch"]


def _fwd(log, p, capturing):
    b, h, hk, i, j, d = p.dims
    ws = RecordingWorkspace(capturing)
    with gpu_launch.using_workspace(ws):
        gpu_launch.gpu_forward(p, _dev(np.zeros((b, h, i, d), p.dtype)),
                               _dev(np.zeros((b, h, i), np.float32)))
    return ws


@pytest.mark.parametrize("bias,l2norm", [("heads", True), (None, False), ("full", False)])
def test_fake_forward_in_capture_never_reads_back(fake_gpu, bias, l2norm):
    _fwd(fake_gpu, _fake_problem(bias=bias, l2norm=l2norm), capturing=True)
    assert FakeDeviceArray.reads == []
    fwd = [n for n in _launched(fake_gpu) if n.startswith("attn_fwd")]
    assert fwd == ["attn_fwd_mma<64, __half, true, 4>"]


@pytest.mark.parametrize("bias,l2norm", [("heads", True), (None, False)])
def test_fake_forward_eager_reads_back_once_and_preloads_the_online_variant(fake_gpu, bias,
                                                                           l2norm):
    _fwd(fake_gpu, _fake_problem(bias=bias, l2norm=l2norm), capturing=False)
    assert len(FakeDeviceArray.reads) == 1, "one synchronisation for the shift"
    assert [n for n in _launched(fake_gpu) if n.startswith("attn_fwd")] == [
        "attn_fwd_mma<64, __half, false, 4>"]
    loaded = [e[1] for e in fake_gpu if e[0] == "get_function"]
    assert "attn_fwd_mma<64, __half, true, 4>" in loaded, "online variant not preloaded"


@pytest.mark.parametrize("capturing", [False, True])
def test_fake_forward_without_data_dependence(fake_gpu, capturing):
    ws = _fwd(fake_gpu, _fake_problem(), capturing=capturing)
    assert FakeDeviceArray.reads == []
    names = [e[1] for e in fake_gpu if e[0] == "get_function"]
    assert "attn_fwd_mma<64, __half, true, 4>" not in names
    assert [n for n in _launched(fake_gpu) if n.startswith("attn_fwd")] == [
        "attn_fwd_mma<64, __half, false, 4>"]
    assert {s for s, _ in ws.shapes} == {(2, 4, 8, 64), (2, 4, 12, 64), (2 * 4 * 8, 1),
                                         (2 * 4 * 12, 1)}


def _bwd(log, p, deterministic, capturing=True):
    b, h, hk, i, j, d = p.dims
    dt = p.dtype
    ws = RecordingWorkspace(capturing)
    z = lambda *s, t=dt: _dev(np.zeros(s, t))   # noqa: E731
    dbias = None if p.bias is None else z(*p.bias.shape)
    with gpu_launch.using_workspace(ws):
        gpu_launch.gpu_backward(p, z(b, h, i, d), z(b, h, i, d), z(b, h, i, t=np.float32),
                                z(b, h, i, d), z(b, hk, j, d), z(b, hk, j, d), dbias,
                                deterministic=deterministic)
    assert FakeDeviceArray.reads == [], "the backward must never read back"
    return ws


@pytest.mark.parametrize("dtype,bias,deterministic,sums", [
    ("float16", "heads", True, (1, 0)),
    ("float16", "batch", True, (0, 1)),
    ("float32", "heads", False, (1, 0)),
    ("float32", "batch", False, (0, 1)),
])
def test_fake_backward_sums_broadcast_bias_gradients_with_its_own_kernel(fake_gpu, dtype, bias,
                                                                        deterministic, sums):
    p = _fake_problem(dtype=dtype, bias=bias)
    ws = _bwd(fake_gpu, p, deterministic)
    b, h, hk, i, j, d = p.dims
    launches = [e for e in fake_gpu if e[0] == "launch"]
    red = [e for e in launches if e[1] == gpu_launch.SUM_BROADCAST_NAME]
    assert len(red) == 1
    _, _, grid, block, args, _ = red[0]
    full, out = args[0], args[1]
    assert full.shape == (b, h, i, j) and out.shape == tuple(p.bias.shape)
    assert int(args[2]) == out.size and int(args[3]) == i * j
    assert (int(args[4]), int(args[5]), int(args[6])) == (b, h, p.bias.shape[1])
    assert (int(args[7]), int(args[8])) == sums
    assert block == (256,) and grid == (max(1, -(-out.size // 256)),)
    assert ((b, h, i, j), np.dtype(np.float32)) in ws.shapes
    # the reduced gradient is what the final cast reads
    cast = [e for e in launches if e[1].startswith("scale_cast")]
    assert any(e[4][0] is out for e in cast)


@pytest.mark.parametrize("bias", ["heads", "full", None])
def test_fake_backward_atomic_paths(fake_gpu, bias):
    p = _fake_problem(bias=bias)
    _bwd(fake_gpu, p, deterministic=False)
    names = _launched(fake_gpu)
    assert gpu_launch.SUM_BROADCAST_NAME not in names
    assert "attn_bwd_kv_mma<64, __half, true>" in names
    assert not any(n.startswith("attn_bwd_q_mma") for n in names)


def test_fake_hopper_dispatch(fake_gpu, monkeypatch):
    """On sm_90 the fixed-shift forward and the atomic backward go to hopper_launch with the
    sm_80 kernels' argument tuples; a capture with a bias stays on the sm_80 online forward."""
    from cupy_cosine_attn import hopper_launch
    calls = []
    monkeypatch.setattr(hopper_launch, "device_is_sm90", lambda: True)
    monkeypatch.setattr(hopper_launch, "launch",
                        lambda ct, d, args, b, h, i: calls.append(("fwd", ct, d, len(args))))
    monkeypatch.setattr(hopper_launch, "launch_backward",
                        lambda ct, d, args, b, hk, j: calls.append(("bwd", ct, d, len(args))))
    p = _fake_problem(bias="heads")
    _fwd(fake_gpu, p, capturing=False)
    assert calls == [("fwd", "__half", 64, 19)]
    assert not [n for n in _launched(fake_gpu) if n.startswith("attn_fwd")]
    loaded = [e[1] for e in fake_gpu if e[0] == "get_function"]
    assert "attn_fwd_mma<64, __half, true, 4>" in loaded, "online variant not preloaded"
    calls.clear()
    fake_gpu.clear()
    FakeDeviceArray.reads = []
    _fwd(fake_gpu, p, capturing=True)
    assert FakeDeviceArray.reads == []
    assert calls == []
    assert [n for n in _launched(fake_gpu) if n.startswith("attn_fwd")] == [
        "attn_fwd_mma<64, __half, true, 4>"]
    _bwd(fake_gpu, p, deterministic=False)
    assert calls == [("bwd", "__half", 64, 25)]


def test_fake_forward_keeps_the_normalised_inputs_for_the_backward(fake_gpu):
    """keep: the forward normalises q and k into the caller's arrays (no workspace copies of
    them), and a backward handed those arrays and norms launches no normalisation, only the
    gradient through it, reading the kept norms."""
    p = _fake_problem(dtype="float16", i=8, j=12)
    b, h, hk, i, j, d = p.dims
    keep = (_dev(np.zeros((b, h, i, d), np.float16)), _dev(np.zeros((b * h * i, 1), np.float32)),
            _dev(np.zeros((b, hk, j, d), np.float16)), _dev(np.zeros((b * hk * j, 1), np.float32)))
    ws = RecordingWorkspace(False)
    with gpu_launch.using_workspace(ws):
        gpu_launch.gpu_forward(p, _dev(np.zeros((b, h, i, d), p.dtype)),
                               _dev(np.zeros((b, h, i), np.float32)), keep)
    assert ws.shapes == []
    norm = [e for e in fake_gpu if e[0] == "launch" and e[1].startswith("l2norm_rows")]
    assert [(e[4][1], e[4][2]) for e in norm] == [(keep[0], keep[1]), (keep[2], keep[3])]
    fake_gpu.clear()
    p2 = make_problem(keep[0], keep[2], p.v)
    ws = RecordingWorkspace(False)
    z = lambda *s, t=np.float16: _dev(np.zeros(s, t))   # noqa: E731
    with gpu_launch.using_workspace(ws):
        gpu_launch.gpu_backward(p2, z(b, h, i, d), z(b, h, i, d), z(b, h, i, t=np.float32),
                                z(b, h, i, d), z(b, hk, j, d), z(b, hk, j, d), None,
                                normalised=(keep[1], keep[3]))
    names = _launched(fake_gpu)
    assert not any(n.startswith("l2norm_rows") for n in names)
    grads = [e for e in fake_gpu if e[0] == "launch" and e[1].startswith("l2norm_backward")]
    assert [(e[4][1], e[4][2]) for e in grads] == [(keep[0], keep[1]), (keep[2], keep[3])]


def test_fake_keep_and_normalised_need_l2norm(fake_gpu):
    p = _fake_problem(l2norm=False)
    b, h, hk, i, j, d = p.dims
    z = lambda *s, t=np.float16: _dev(np.zeros(s, t))   # noqa: E731
    with pytest.raises(ValueError, match="keep"):
        gpu_launch.gpu_forward(p, z(b, h, i, d), z(b, h, i, t=np.float32),
                               (z(b, h, i, d), z(b * h * i, 1, t=np.float32),
                                z(b, hk, j, d), z(b * hk * j, 1, t=np.float32)))
    with pytest.raises(ValueError, match="normalised"):
        gpu_launch.gpu_backward(p, z(b, h, i, d), z(b, h, i, d), z(b, h, i, t=np.float32),
                                z(b, h, i, d), z(b, hk, j, d), z(b, hk, j, d), None,
                                normalised=(z(b * h * i, 1, t=np.float32),
                                            z(b * hk * j, 1, t=np.float32)))
    assert _launched(fake_gpu) == []


def test_row_v8_layout():
    """Threads per row and per summed group of the 8-elements-per-thread normalisation passes."""
    assert gpu_launch.row_v8_layout(64, 1) == (8, 8)
    assert gpu_launch.row_v8_layout(24, 1) == (4, 4)          # one idle lane per row
    assert gpu_launch.row_v8_layout(256, 1) == (32, 32)
    assert gpu_launch.row_v8_layout(128, 4) == (16, 4)
    assert gpu_launch.row_v8_layout(64, 8) == (8, 1)
    assert gpu_launch.row_v8_layout(96, 4) is None             # groups of 24: 3 lanes, not a power of two
    assert gpu_launch.row_v8_layout(64, 16) is None            # groups of 4 elements
    assert gpu_launch.row_v8_layout(20, 1) is None
