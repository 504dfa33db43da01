"""GPU backward kernels against float64 torch autograd on the CPU, with NaN-poisoned outputs.

fp32 must reach 1e-5 relative-norm error; fp16/bf16 no worse than 1.5x the error of torch SDPA's
backward (math backend, GPU, same normalised inputs and dtype) against the same float64
reference, with a floor of 3e-3. lse and out come from the float64 reference, so these tests do
not depend on the forward kernels.
"""
import math
import random
import zlib

import pytest

from gpu_support import require_gpu

pytestmark = pytest.mark.gpu
require_gpu()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from conftest import ref_attention  # noqa: E402
from cupy_cosine_attn import gpu_bridge  # noqa: E402
from cupy_cosine_attn.gpu.backward import gpu_backward  # noqa: E402
from cupy_cosine_attn.problem import make_problem  # noqa: E402

DEV = "cuda"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FLOOR = 3e-3
F32_TOL = 1e-5
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 192, 256)


def rel_err(x, ref):
    x = x.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    if not torch.isfinite(x).all():
        return math.inf
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else num


def make_inputs(seed, dtype, b, h, hk, i, j, d, mask, bias, dead_rows, l2norm):
    g = torch.Generator().manual_seed(seed)
    td = DTYPES[dtype]

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(td)

    q, k, v, dout = rn(b, h, i, d), rn(b, hk, j, d), rn(b, hk, j, d), rn(b, h, i, d)
    if not l2norm:
        q, k = (q.double() * 0.5).to(td), (k.double() * 0.5).to(td)
    m = None
    if mask:
        m = torch.rand(b, j, generator=g) < 0.7
        if dead_rows:
            m[0] = False
    bb, bbd = None, False
    if bias == "heads":
        bb = rn(h, i, j)
    elif bias == "batch":
        bb, bbd = rn(b, i, j), True
    elif bias == "full":
        bb = rn(b, h, i, j)
    return q, k, v, dout, m, bb, bbd


def reference(q, k, v, dout, m, bb, bbd, **kw):
    leaves = [t.to(torch.float64).requires_grad_() for t in (q, k, v)]
    bias = None if bb is None else bb.to(torch.float64).requires_grad_()
    out, lse = ref_attention(*leaves, mask=m, attn_bias=bias, attn_bias_batch_dim=bbd, **kw)
    ins = leaves + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out, ins, dout.to(torch.float64), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, ins)]
    return out.detach(), lse.detach(), grads


def l2norm_groups(x, groups):
    d = x.shape[-1]
    xg = x.reshape(*x.shape[:-1], groups, d // groups)
    n = torch.linalg.vector_norm(xg, dim=-1, keepdim=True)
    r = torch.where(n > 1e-12, 1.0 / n.clamp_min(1e-12), torch.zeros_like(n))
    return (xg * r).reshape(x.shape)


def sdpa_grads(q, k, v, dout, m, bb, bbd, scale, groups, causal, l2norm):
    """torch SDPA (math backend) gradients in the input dtype on the GPU, same visibility."""
    td = q.dtype
    leaves = [t.to(DEV).requires_grad_() for t in (q, k, v)]
    bias = None if bb is None else bb.to(DEV).requires_grad_()
    qq, kk, vv = leaves
    b, h, i, d = qq.shape
    hk, j = kk.shape[1], kk.shape[2]
    if l2norm:
        qq = l2norm_groups(qq.float(), groups).to(td)
        kk = l2norm_groups(kk.float(), groups).to(td)
    kk, vv = kk.repeat_interleave(h // hk, 1), vv.repeat_interleave(h // hk, 1)
    vis = torch.ones(b, 1, i, j, dtype=torch.bool, device=DEV)
    if causal:
        vis &= torch.ones(i, j, dtype=torch.bool, device=DEV).tril(j - i)
    if m is not None:
        vis &= m.to(DEV)[:, None, None, :]
    dead = ~vis.any(-1, keepdim=True)
    # rows that see nothing: unmask them and zero their upstream gradient, which keeps SDPA
    # finite and gives them exactly zero gradient, like the definition
    vis = vis | dead
    add = torch.zeros(b, 1, i, j, dtype=td, device=DEV)
    if bias is not None:
        add = add + (bias if bias.dim() == 4 else bias[:, None] if bbd else bias[None])
    add = add.masked_fill(~vis, float("-inf"))
    do = dout.to(DEV).masked_fill(dead.expand(b, h, i, 1), 0)
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=add, scale=scale)
    ins = leaves + ([bias] if bias is not None else [])
    grads = torch.autograd.grad(out, ins, do, allow_unused=True)
    return [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, ins)]


def run_gpu(q, k, v, dout, m, bb, bbd, out64, lse64, scale, groups, causal, l2norm,
            deterministic=False):
    """(dq, dk, dv, dbias) from gpu_backward with NaN-poisoned torch outputs."""
    td = q.dtype
    qg, kg, vg = (t.to(DEV) for t in (q, k, v))
    mg = None if m is None else m.to(DEV)
    bg = None if bb is None else bb.to(DEV)
    prob = make_problem(qg, kg, vg, mask=mg, attn_bias=bg, scale=scale, groups=groups,
                        causal=causal, l2norm_qk=l2norm, attn_bias_batch_dim=bbd)
    b, h, hk, i, j, d = prob.dims
    dq = torch.full(q.shape, float("nan"), dtype=td, device=DEV)
    dk = torch.full(k.shape, float("nan"), dtype=td, device=DEV)
    dv = torch.full(v.shape, float("nan"), dtype=td, device=DEV)
    db = None if bb is None else torch.full(bb.shape, float("nan"), dtype=td, device=DEV)
    do = dout.to(DEV).contiguous()
    o = out64.to(td).to(DEV).contiguous()
    lse = lse64.to(torch.float32).to(DEV).contiguous()
    cv = gpu_bridge._as_cupy
    with gpu_bridge._on_callers_stream(prob):
        gpu_backward(gpu_bridge._cupy_problem(prob), cv(do).reshape(b, h, i, d),
                     cv(o).reshape(b, h, i, d), cv(lse).reshape(b, h, i),
                     cv(dq).reshape(b, h, i, d), cv(dk).reshape(b, hk, j, d),
                     cv(dv).reshape(b, hk, j, d),
                     None if db is None else cv(db).reshape(prob.bias.shape),
                     deterministic=deterministic)
    torch.cuda.synchronize()
    return [dq, dk, dv] + ([db] if db is not None else [])


def check_case(seed, dtype, b=2, h=2, hk=None, i=37, j=53, d=64, mask=False, causal=False,
               bias=None, groups=1, l2norm=True, scale=None, dead_rows=False,
               deterministic=False):
    hk = h if hk is None else hk
    scale = (8.0 if l2norm else d ** -0.5) if scale is None else scale
    q, k, v, dout, m, bb, bbd = make_inputs(seed, dtype, b, h, hk, i, j, d, mask, bias,
                                            dead_rows, l2norm)
    kw = dict(scale=scale, groups=groups, causal=causal, l2norm_qk=l2norm)
    out64, lse64, ref = reference(q, k, v, dout, m, bb, bbd, **kw)
    got = run_gpu(q, k, v, dout, m, bb, bbd, out64, lse64, scale, groups, causal, l2norm,
                  deterministic)
    base = None
    if dtype != "float32":
        base = sdpa_grads(q, k, v, dout, m, bb, bbd, scale, groups, causal, l2norm)
    names = ["dq", "dk", "dv", "dbias"]
    report = []
    for n, x, r, bs in zip(names, got, ref, base if base is not None else [None] * 4):
        err = rel_err(x, r)
        tol = F32_TOL if bs is None else max(FLOOR, 1.5 * rel_err(bs, r))
        report.append((n, err, tol))
    bad = [(n, e, t) for n, e, t in report if not e <= t]
    assert not bad, f"{dtype} d={d}: " + ", ".join(f"{n} err {e:.3g} > tol {t:.3g}"
                                                    for n, e, t in bad)
    return got


# Randomised grid: every dtype x head dim, each with randomly drawn features.
def _grid():
    rng = random.Random(1234)
    cases = []
    for dtype in DTYPES:
        for d in HEAD_DIMS:
            h = rng.choice([1, 2, 4])
            hk = rng.choice([x for x in (1, 2, 4) if h % x == 0])
            i = rng.choice([1, 7, 33, 64, 65, 100, 129])
            j = rng.choice([1, 9, 31, 64, 80, 127, 150])
            groups = rng.choice([g for g in (1, 2, 4) if d % (8 * g) == 0])
            cases.append(dict(dtype=dtype, d=d, b=rng.choice([1, 2]), h=h, hk=hk, i=i, j=j,
                              mask=rng.random() < 0.5, causal=rng.random() < 0.5,
                              bias=rng.choice([None, "heads", "batch", "full"]), groups=groups,
                              l2norm=rng.random() < 0.85,
                              deterministic=rng.random() < 0.3))
    return cases


GRID = _grid()


@pytest.mark.parametrize("case", GRID, ids=[f"{c['dtype']}-d{c['d']}-{n}" for n, c in enumerate(GRID)])
def test_random_grid(case):
    check_case(seed=zlib.crc32(repr(sorted(case.items())).encode()) % 10000, **case)


FEATURES = [
    dict(i=128, j=128),
    dict(i=1, j=77),
    dict(i=77, j=1),
    dict(i=77, j=200, causal=True),
    dict(i=200, j=77, causal=True),                 # rows that see no key
    dict(i=131, j=131, causal=True, mask=True),
    dict(i=65, j=130, mask=True, dead_rows=True),   # a batch whose keys are all masked
    dict(i=100, j=150, bias="heads"),
    dict(i=100, j=150, bias="batch", causal=True),
    dict(i=64, j=96, bias="full", causal=True, mask=True),
    dict(i=90, j=90, h=4, hk=1),                    # MQA
    dict(i=90, j=71, h=4, hk=2, bias="heads", mask=True),  # GQA
    dict(i=50, j=50, groups=4),
    dict(i=50, j=70, l2norm=False),
]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("feat", FEATURES, ids=[str(n) for n in range(len(FEATURES))])
@pytest.mark.parametrize("deterministic", [False, True])
def test_features(dtype, feat, deterministic):
    kw = dict(d=64)
    kw.update(feat)
    check_case(seed=7, dtype=dtype, deterministic=deterministic, **kw)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_deterministic_bitwise(dtype):
    kw = dict(seed=11, dtype=dtype, b=2, h=4, hk=2, i=300, j=257, d=128, mask=True, causal=True,
              bias="heads", deterministic=True)
    a = check_case(**kw)
    b = check_case(**kw)
    for x, y in zip(a, b):
        assert torch.equal(x.view(torch.int16) if x.dtype != torch.float32 else x.view(torch.int32),
                           y.view(torch.int16) if y.dtype != torch.float32 else y.view(torch.int32))


def test_unsupported_head_dim_raises():
    for d in (8, 20, 264):
        q = torch.randn(1, 1, 4, d, device=DEV, dtype=torch.float16)
        prob = gpu_bridge._cupy_problem(make_problem(q, q, q))
        cv = gpu_bridge._as_cupy
        z = torch.empty_like(q)
        with pytest.raises(ValueError, match="supported"):
            gpu_backward(prob, cv(z), cv(z), cv(torch.zeros(1, 1, 4, device=DEV)), cv(z), cv(z),
                         cv(z), None)


def test_empty_problem_writes_zeros():
    q = torch.randn(2, 2, 5, 32, device=DEV, dtype=torch.float16)
    k = torch.randn(2, 2, 0, 32, device=DEV, dtype=torch.float16)
    prob = gpu_bridge._cupy_problem(make_problem(q, k, k))
    cv = gpu_bridge._as_cupy
    dq = torch.full_like(q, float("nan"))
    gpu_backward(prob, cv(q), cv(q), cv(torch.zeros(2, 2, 5, device=DEV)), cv(dq), cv(k),
                 cv(k), None)
    torch.cuda.synchronize()
    assert torch.equal(dq, torch.zeros_like(dq))


def test_over_2_31_elements():
    """q, k, v, dout with more than 2^31 elements: batches past the 32-bit offset limit."""
    free = torch.cuda.mem_get_info()[0]
    if free < 80 * 2**30:
        pytest.skip("needs about 80 GiB of free GPU memory")
    b, h, n, d = 1040, 16, 1024, 128          # 2.18e9 elements per tensor
    assert b * h * n * d > 2**31
    td = torch.float16
    torch.manual_seed(0)
    q = torch.randn(b, h, n, d, device=DEV, dtype=td)
    k = torch.randn(b, h, n, d, device=DEV, dtype=td)
    v = torch.randn(b, h, n, d, device=DEV, dtype=td)
    dout = torch.randn(b, h, n, d, device=DEV, dtype=td)
    scale = 8.0
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, device=DEV, dtype=torch.float32)
    for s in range(0, b, 64):                  # out, lse in fp32 on the GPU, a slice at a time
        qs = l2norm_groups(q[s:s + 64].float(), 1)
        ks = l2norm_groups(k[s:s + 64].float(), 1)
        logits = scale * qs @ ks.transpose(-1, -2)
        lse[s:s + 64] = torch.logsumexp(logits, -1)
        out[s:s + 64] = (torch.softmax(logits, -1) @ v[s:s + 64].float()).to(td)
        del qs, ks, logits
    prob = make_problem(q, k, v, scale=scale)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    cv = gpu_bridge._as_cupy
    with gpu_bridge._on_callers_stream(prob):
        gpu_backward(gpu_bridge._cupy_problem(prob), cv(dout), cv(out), cv(lse), cv(dq), cv(dk),
                     cv(dv), None)
    torch.cuda.synchronize()
    last = slice(b - 1, b)                     # offsets beyond 2^31 elements
    o64, l64, ref = reference(q[last].cpu(), k[last].cpu(), v[last].cpu(), dout[last].cpu(),
                              None, None, False, scale=scale, groups=1, causal=False,
                              l2norm_qk=True)
    base = sdpa_grads(q[last].cpu(), k[last].cpu(), v[last].cpu(), dout[last].cpu(), None, None,
                      False, scale, 1, False, True)
    for n_, x, r, bs in zip(("dq", "dk", "dv"), (dq[last], dk[last], dv[last]), ref, base):
        err, tol = rel_err(x, r), max(FLOOR, 1.5 * rel_err(bs, r))
        assert err <= tol, f"{n_}: {err:.3g} > {tol:.3g}"
    for x in (dq, dk, dv):
        assert torch.isfinite(x).all()
