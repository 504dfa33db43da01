"""CUDA graphs, streams and devices.

* forward + backward captured in a torch.cuda.CUDAGraph (after the documented warm-up on a side
  stream) replay right for NEW values copied into the static inputs, including a bias whose range
  at replay is far beyond the one at capture (the capture must use the online softmax);
* torch.compile(mode="reduce-overhead") (cudagraph trees: warm-up, record, replay) matches eager;
* every call waits for work queued on the caller's current stream (a sleeping non-default stream
  makes a launch on any other stream read stale inputs);
* tensors on cuda:1 run there, eagerly and captured (skipped with one GPU);
* CuPy callers work with torch unimportable, on CuPy's current non-default stream, and inside a
  CuPy stream capture (subprocess, checked against a NumPy float64 computation).
"""
import os
import subprocess
import sys
import textwrap

import pytest

from gpu_support import require_gpu

pytestmark = pytest.mark.gpu
require_gpu()

import torch  # noqa: E402

import cupy_cosine_attn as ca  # noqa: E402
from helpers import rel_err, truth  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Against the float64 definition (rounding of the inputs' dtype).
OUT_TOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}
GRAD_TOL = {"float16": 2e-2, "bfloat16": 8e-2, "float32": 1e-4}
# Graph replay against eager on the same values: the same kernels, except that a capture with a
# bias runs the online-softmax forward where eager may run the fixed-shift one (both exact up to
# rounding of out to the dtype), and dq's fp32 atomics may add in another order.
SAME_TOL = {"float16": 3e-3, "bfloat16": 2e-2, "float32": 2e-5}
SAME_GRAD_TOL = {"float16": 1e-2, "bfloat16": 5e-2, "float32": 1e-4}

FEATURES = {
    "plain": dict(),
    "mask": dict(mask=True),
    "bias_heads": dict(bias="heads"),
    "bias_batch_mask": dict(bias="batch", mask=True),
}


def make_inputs(dtype, device="cuda", seed=0, b=2, h=4, i=128, j=160, d=64, mask=False,
                bias=None, bias_scale=1.0):
    """q, k, v, mask, bias, dout (bias (h, i, j) or (b, i, j)); no requires_grad."""
    dt = DTYPES[dtype]
    g = torch.Generator(device=device).manual_seed(seed)
    x = dict(
        q=torch.randn(b, h, i, d, device=device, generator=g).to(dt),
        k=torch.randn(b, h, j, d, device=device, generator=g).to(dt),
        v=torch.randn(b, h, j, d, device=device, generator=g).to(dt),
        mask=(torch.rand(b, j, device=device, generator=g) > 0.3) if mask else None,
        bias=None,
        dout=torch.randn(b, h, i, d, device=device, generator=g).to(dt))
    if bias is not None:
        shape = (h, i, j) if bias == "heads" else (b, i, j)
        x["bias"] = (torch.randn(*shape, device=device, generator=g) * bias_scale).to(dt)
    return x


def leaves_of(x):
    return [x[n] for n in ("q", "k", "v", "bias") if x[n] is not None]


def fresh_leaves(x):
    """A copy of the inputs whose q, k, v, bias are new autograd leaves."""
    y = {n: (None if t is None else t.detach().clone()) for n, t in x.items()}
    for t in leaves_of(y):
        t.requires_grad_()
    return y


def step(x, causal, bias_batch_dim, deterministic=False):
    """out and the gradients of every leaf for upstream x['dout']."""
    out = ca.flash_cosine_sim_attention(x["q"], x["k"], x["v"], mask=x["mask"],
                                        attn_bias=x["bias"], causal=causal,
                                        attn_bias_batch_dim=bias_batch_dim,
                                        deterministic=deterministic)
    grads = torch.autograd.grad(out, leaves_of(x), x["dout"])
    return out, list(grads)


def reference(x, causal, bias_batch_dim):
    """float64 out and gradients of the definition (helpers.truth) for the values in x."""
    l64 = {n: (None if t is None or not t.is_floating_point() else t.detach().double())
           for n, t in x.items()}
    l64["mask"] = x["mask"]
    for t in leaves_of(l64):
        t.requires_grad_()
    out, _ = truth(l64["q"], l64["k"], l64["v"], l64["mask"], l64["bias"], causal=causal,
                   bias_batch_dim=bias_batch_dim)
    grads = torch.autograd.grad(out, leaves_of(l64), l64["dout"])
    return out.detach(), list(grads)


def check_against(out, grads, ref_out, ref_grads, tol, grad_tol, what):
    assert torch.isfinite(out).all(), f"{what}: out not finite"
    err = rel_err(out, ref_out)
    assert err <= tol, f"{what}: out relative error {err:.3g} > {tol}"
    for name, gr, rg in zip("qkvb", grads, ref_grads):
        assert torch.isfinite(gr).all(), f"{what}: d{name} not finite"
        err = rel_err(gr, rg)
        assert err <= grad_tol, f"{what}: d{name} relative error {err:.3g} > {grad_tol}"


def capture(static, causal, bbd, deterministic, stream=None):
    """Warm up on a side stream, then capture step(static) into a new CUDAGraph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step(static, causal, bbd, deterministic)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out, grads = step(static, causal, bbd, deterministic)
    return graph, out, grads


def replay_and_check(graph, static, s_out, s_grads, new, dtype, causal, bbd, deterministic,
                     against_truth=True):
    with torch.no_grad():
        for n, t in new.items():
            if t is not None:
                static[n].copy_(t)
    graph.replay()
    torch.cuda.synchronize()
    eager = fresh_leaves(new)
    e_out, e_grads = step(eager, causal, bbd, deterministic)
    torch.cuda.synchronize()
    same_variant = new["bias"] is None     # fixed shift both in eager and in the capture
    if same_variant:                       # forward kernels have no atomics: bitwise equal
        assert torch.equal(s_out, e_out), "replayed out differs from eager"
        if deterministic:
            for a, b in zip(s_grads, e_grads):
                assert torch.equal(a, b), "replayed deterministic gradients differ from eager"
    check_against(s_out, s_grads, e_out, e_grads, SAME_TOL[dtype], SAME_GRAD_TOL[dtype],
                  "replay vs eager")
    if not against_truth:
        return
    ref_out, ref_grads = reference(new, causal, bbd)
    check_against(e_out, e_grads, ref_out, ref_grads, OUT_TOL[dtype], GRAD_TOL[dtype],
                  "eager vs float64")
    check_against(s_out, s_grads, ref_out, ref_grads, OUT_TOL[dtype], GRAD_TOL[dtype],
                  "replay vs float64")


def graph_case(dtype, causal, feature, deterministic, device="cuda", stream=None):
    kw = FEATURES[feature]
    bbd = kw.get("bias") == "batch"
    static = fresh_leaves(make_inputs(dtype, device, seed=1, **kw))
    graph, s_out, s_grads = capture(static, causal, bbd, deterministic, stream)
    assert s_out.device == static["q"].device
    replay_and_check(graph, static, s_out, s_grads, make_inputs(dtype, device, seed=2, **kw),
                     dtype, causal, bbd, deterministic)
    if kw.get("bias"):
        # A bias 30x wider than at capture: a fixed shift chosen at capture time would overflow
        # or underflow, the captured online softmax must not care. Eager takes the online
        # variant too here; the softmax is nearly one-hot, where the float64 definition's
        # gradients differ from any stored-out implementation's by more than the rounding
        # tolerance (see conftest.ref_grads), so only replay vs eager is compared.
        replay_and_check(graph, static, s_out, s_grads,
                         make_inputs(dtype, device, seed=3, bias_scale=30.0, **kw),
                         dtype, causal, bbd, deterministic, against_truth=False)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_graph_capture_replays_new_values(dtype, causal, feature, deterministic):
    graph_case(dtype, causal, feature, deterministic)


@pytest.mark.parametrize("feature", ["plain", "bias_heads", "bias_batch_mask"])
def test_cuda_graph_capture_float32(feature):
    graph_case("float32", True, feature, False)


def test_cuda_graph_capture_without_l2norm():
    """l2norm_qk=False reads the largest norms back eagerly; a capture must not."""
    x = make_inputs("float16", seed=4)
    qn, kn = ca.l2norm_tensors(x["q"], x["k"])
    x["q"], x["k"] = qn * 1.5, kn
    static = fresh_leaves(x)

    def run(y):
        out = ca.flash_cosine_sim_attention(y["q"], y["k"], y["v"], l2norm_qk=False)
        return out, list(torch.autograd.grad(out, leaves_of(y), y["dout"]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_out, s_grads = run(static)
    new = make_inputs("float16", seed=5)
    qn, kn = ca.l2norm_tensors(new["q"], new["k"])
    new["q"], new["k"] = qn * 3.0, kn * 2.0           # norms beyond those seen at capture
    with torch.no_grad():
        for n in ("q", "k", "v", "dout"):
            static[n].copy_(new[n])
    graph.replay()
    torch.cuda.synchronize()
    e_out, e_grads = run(fresh_leaves(new))
    check_against(s_out, s_grads, e_out, e_grads, SAME_TOL["float16"],
                  SAME_GRAD_TOL["float16"], "replay vs eager")


def test_compile_reduce_overhead_matches_eager():
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()

    def f(q, k, v, bias):
        return ca.flash_cosine_sim_attention(q, k, v, attn_bias=bias, causal=True) * 2

    cf = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for it in range(3):          # cudagraph trees: warm-up, record, replay
        x = make_inputs("float16", seed=10 + it, bias="heads",
                        bias_scale=30.0 if it == 2 else 1.0)
        c = fresh_leaves(x)
        torch.compiler.cudagraph_mark_step_begin()
        out = cf(c["q"], c["k"], c["v"], c["bias"])
        grads = torch.autograd.grad(out, leaves_of(c), x["dout"])
        out, grads = out.detach().clone(), [g.clone() for g in grads]   # before the next run
        e = fresh_leaves(x)
        e_out = f(e["q"], e["k"], e["v"], e["bias"])
        e_grads = torch.autograd.grad(e_out, leaves_of(e), x["dout"])
        check_against(out, grads, e_out, e_grads, SAME_TOL["float16"], SAME_GRAD_TOL["float16"],
                      f"compiled call {it}")
    assert counters["inductor"].get("cudagraph_skips", 0) == 0, dict(counters["inductor"])


@pytest.mark.parametrize("feature", ["plain", "bias", "no_l2norm"])
def test_waits_for_work_queued_on_the_current_stream(feature):
    """Inputs are written on a non-default stream behind a long sleep: kernels (and the shift's
    read-back) on any other stream would see the old values."""
    old = make_inputs("bfloat16", seed=20, bias="heads" if feature == "bias" else None)
    new = make_inputs("bfloat16", seed=21, bias="heads" if feature == "bias" else None)
    if feature == "no_l2norm":
        for x in (old, new):
            x["q"], x["k"] = ca.l2norm_tensors(x["q"], x["k"])
    x = {n: (None if t is None else t.clone()) for n, t in old.items()}
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)            # ~0.1 s of GPU time before the new values
        for n, t in new.items():
            if t is not None:
                x[n].copy_(t)
        for t in leaves_of(x):
            t.requires_grad_()
        out = ca.flash_cosine_sim_attention(x["q"], x["k"], x["v"], attn_bias=x["bias"],
                                            l2norm_qk=feature != "no_l2norm")
        grads = torch.autograd.grad(out, leaves_of(x), x["dout"])
    torch.cuda.synchronize()
    l64 = {n: (None if t is None else t.detach().double().requires_grad_())
           for n, t in new.items()}          # (no mask in this test)
    ref = truth(l64["q"], l64["k"], l64["v"], bias=l64["bias"],
                l2norm_qk=feature != "no_l2norm")[0]
    ref_grads = torch.autograd.grad(ref, leaves_of(l64), l64["dout"])
    check_against(out, grads, ref, ref_grads, OUT_TOL["bfloat16"], GRAD_TOL["bfloat16"],
                  "side stream")


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@two_gpus
def test_second_device_eager_and_on_its_own_stream():
    assert torch.cuda.current_device() == 0
    x = make_inputs("float16", device="cuda:1", seed=30, bias="batch", mask=True)
    e = fresh_leaves(x)
    out, grads = step(e, True, True)
    assert out.device == torch.device("cuda:1")
    assert all(g.device == torch.device("cuda:1") for g in grads)
    assert torch.cuda.current_device() == 0, "the call changed the current device"
    ref_out, ref_grads = reference(x, True, True)
    check_against(out, grads, ref_out, ref_grads, OUT_TOL["float16"], GRAD_TOL["float16"],
                  "cuda:1")
    s1 = torch.cuda.Stream(device=1)
    s1.wait_stream(torch.cuda.current_stream(1))
    with torch.cuda.stream(s1):            # current stream of device 1; current device stays 0
        with torch.cuda.device(1):
            torch.cuda._sleep(100_000_000)     # (sleeps on the current device's stream)
            y = fresh_leaves(x)                # inputs written on s1 after the sleep
        assert torch.cuda.current_device() == 0
        out2, grads2 = step(y, True, True)
    torch.cuda.synchronize(1)
    check_against(out2, grads2, ref_out, ref_grads, OUT_TOL["float16"], GRAD_TOL["float16"],
                  "cuda:1 side stream")


@two_gpus
def test_second_device_graph_capture():
    with torch.cuda.device(1):
        graph_case("bfloat16", True, "bias_heads", False, device="cuda:1",
                   stream=torch.cuda.Stream(device=1))


# ---------------------------------------------------------------------------------------------
# CuPy callers, torch unimportable
# ---------------------------------------------------------------------------------------------

CUPY_SCRIPT = textwrap.dedent(r'''
    import sys
    sys.modules["torch"] = None            # `import torch` raises ImportError from here on
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("torch is still importable")

    import numpy as np
    import cupy as cp

    import cupy_cosine_attn as ca
    from cupy_cosine_attn import gpu_launch

    B, H, I, J, D, SCALE = 2, 3, 70, 90, 64, 8.0
    TOL = {"float32": (1e-4, 1e-4), "float16": (5e-3, 3e-2)}


    def rel(x, ref):
        x = np.asarray(cp.asnumpy(x) if isinstance(x, cp.ndarray) else x, dtype=np.float64)
        assert x.shape == ref.shape, (x.shape, ref.shape)
        assert np.isfinite(x).all(), "not finite"
        return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


    def inputs(seed, dtype, bias_scale=1.0):
        r = np.random.default_rng(seed)
        x = dict(q=r.standard_normal((B, H, I, D)), k=r.standard_normal((B, H, J, D)),
                 v=r.standard_normal((B, H, J, D)), dout=r.standard_normal((B, H, I, D)),
                 bias=r.standard_normal((H, I, J)) * bias_scale)
        x = {n: a.astype(dtype) for n, a in x.items()}
        x["mask"] = r.random((B, J)) > 0.3
        return x


    def reference(x, out_stored):
        """float64 out, lse and gradients of causal masked cosine-sim attention with an (h, i, j)
        bias; D = <dout, out> of the stored output, as docs/semantics.md defines the backward."""
        q, k, v, dout, bias = (x[n].astype(np.float64) for n in ("q", "k", "v", "dout", "bias"))
        nq = np.linalg.norm(q, axis=-1, keepdims=True)
        nk = np.linalg.norm(k, axis=-1, keepdims=True)
        qn, kn = q / nq, k / nk
        s = SCALE * qn @ kn.swapaxes(-1, -2) + bias[None]
        rows = np.arange(I)[:, None]
        cols = np.arange(J)[None, :]
        vis = (cols <= rows + (J - I))[None, None] & x["mask"][:, None, None, :]
        s = np.where(vis, s, -np.inf)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0.0)
        e = np.where(vis, np.exp(s - m), 0.0)
        den = e.sum(-1, keepdims=True)
        p = e / np.where(den > 0, den, 1.0)
        out = p @ v
        with np.errstate(divide="ignore"):
            lse = np.where(den[..., 0] > 0, np.log(den[..., 0]) + m[..., 0], -np.inf)
        o = np.asarray(cp.asnumpy(out_stored), dtype=np.float64)
        dp = dout @ v.swapaxes(-1, -2)
        ds = p * (dp - (dout * o).sum(-1, keepdims=True))
        dqn = SCALE * ds @ kn
        dkn = SCALE * ds.swapaxes(-1, -2) @ qn
        dq = (dqn - qn * (qn * dqn).sum(-1, keepdims=True)) / nq
        dk = (dkn - kn * (kn * dkn).sum(-1, keepdims=True)) / nk
        dv = p.swapaxes(-1, -2) @ dout
        return out, lse, (dq, dk, dv, ds.sum(0))


    def on_device(x):
        return {n: cp.asarray(a) for n, a in x.items()}


    def run(g):
        out, lse = ca.forward(g["q"], g["k"], g["v"], mask=g["mask"], attn_bias=g["bias"],
                              scale=SCALE, causal=True)
        grads = ca.backward(g["dout"], g["q"], g["k"], g["v"], out, lse, mask=g["mask"],
                            attn_bias=g["bias"], scale=SCALE, causal=True)
        return out, lse, grads


    def check(x, out, lse, grads, dtype, what):
        ref_out, ref_lse, ref_grads = reference(x, out)
        tol_out, tol_grad = TOL[dtype]
        assert rel(out, ref_out) <= tol_out, (what, "out", rel(out, ref_out))
        lse = cp.asnumpy(lse).astype(np.float64)
        fin = np.isfinite(ref_lse)
        assert (np.isneginf(lse) == ~fin).all(), (what, "lse -inf rows")
        assert np.abs(lse[fin] - ref_lse[fin]).max() <= 2e-2, (what, "lse")
        for name, gr, rg in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads):
            assert gr.dtype == np.dtype(dtype), (what, name, gr.dtype)
            assert rel(gr, rg) <= tol_grad, (what, name, rel(gr, rg))


    for dtype in ("float32", "float16"):
        # eager, default stream
        x = inputs(0, dtype)
        g = on_device(x)
        out, lse, grads = run(g)
        check(x, out, lse, grads, dtype, f"{dtype} eager")
        flash = ca.flash_cosine_sim_attention(g["q"], g["k"], g["v"], mask=g["mask"],
                                              attn_bias=g["bias"], scale=SCALE, causal=True)
        assert isinstance(flash, cp.ndarray) and bool((flash == out).all())

        # CuPy's current non-default stream, eagerly and captured into a CUDA graph: a launch on
        # any other stream would be missing from the graph (stale results at replay) and a host
        # synchronisation inside the capture would fail it
        s = cp.cuda.Stream(non_blocking=True)
        keep = []                                  # captured temporaries live with the graph
        with s, gpu_launch.using_workspace(gpu_launch.CupyWorkspace(keep=keep)):
            g = on_device(x)
            out, lse, grads = run(g)              # warm-up: compiles and loads every variant
            s.synchronize()
            check(x, out, lse, grads, dtype, f"{dtype} non-default stream")
            s.begin_capture()
            out, lse, grads = run(g)
            graph = s.end_capture()
            for seed, bias_scale in ((1, 1.0), (2, 30.0)):
                new = inputs(seed, dtype, bias_scale)
                for n, a in new.items():
                    g[n][...] = cp.asarray(a)
                graph.launch(stream=s)
                s.synchronize()
                check(new, out, lse, grads, dtype, f"{dtype} replay seed {seed}")
        assert keep, "the workspace hook was not used"

    if cp.cuda.runtime.getDeviceCount() > 1:     # arrays on device 1, current device 0
        x = inputs(3, "float32")
        with cp.cuda.Device(1):
            g = on_device(x)
        assert cp.cuda.Device().id == 0
        out, lse, grads = run(g)
        assert out.device.id == 1 and lse.device.id == 1
        assert all(gr.device.id == 1 for gr in grads)
        assert cp.cuda.Device().id == 0
        with cp.cuda.Device(1):
            check(x, out, lse, grads, "float32", "device 1")
    print("CUPY-ONLY OK")
''')


def test_cupy_callers_without_torch(tmp_path):
    script = tmp_path / "cupy_only.py"
    script.write_text(CUPY_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, str(script)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0 and "CUPY-ONLY OK" in res.stdout, (
        f"exit {res.returncode}\nstdout:\n{res.stdout[-4000:]}\nstderr:\n{res.stderr[-8000:]}")
