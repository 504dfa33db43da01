"""The torch custom ops: registration (opcheck), torch.compile without graph breaks, autograd."""
import pytest

torch = pytest.importorskip("torch")

import cupy_cosine_attn as ca  # noqa: E402
from cupy_cosine_attn.torch_ops import attn_backward, attn_forward  # noqa: E402


def _inputs(seed=0, bias=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 19, 16, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 23, 16, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 23, 16, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(4, 19, 23, generator=g, dtype=dtype, requires_grad=True) if bias else None
    mask = torch.rand(2, 23, generator=g) > 0.2
    return q, k, v, mask, b


@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_forward(with_bias):
    q, k, v, mask, b = _inputs(bias=with_bias)
    torch.library.opcheck(attn_forward, (q, k, v, mask, b, 8.0, 1, True, True, False, False))


def test_opcheck_backward():
    q, k, v, mask, b = _inputs()
    out, lse = attn_forward(q, k, v, mask, b, 8.0, 1, True, True, False, False)
    dout = torch.randn_like(out)
    args = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), mask,
            b.detach(), 8.0, 1, True, True, False, False)
    torch.library.opcheck(attn_backward, args)


def test_compile_fullgraph_matches_eager():
    q, k, v, mask, b = _inputs(seed=1)

    def f(q, k, v, b):
        return ca.flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=b, causal=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out_c = compiled(q, k, v, b)
    out_e = f(q, k, v, b)
    assert torch.equal(out_c, out_e)
    gc = torch.autograd.grad(out_c.sum(), (q, k, v, b))
    ge = torch.autograd.grad(out_e.sum(), (q, k, v, b))
    for x, y in zip(gc, ge):
        assert torch.equal(x, y)


def test_deterministic_flag_must_be_bool():
    q, k, v, _, _ = _inputs(bias=False)
    with pytest.raises(TypeError, match="deterministic"):
        ca.flash_cosine_sim_attention(q, k, v, deterministic="yes")


@pytest.mark.parametrize("causal", [False, True])
def test_eager_calls_take_the_function_and_match_the_ops(causal):
    """Eager calls on plain tensors run the autograd.Function; its output and gradients equal the
    custom ops' bit for bit (the same implementation underneath)."""
    q, k, v, mask, b = _inputs(seed=2)
    out = ca.flash_cosine_sim_attention(q, k, v, mask=mask, attn_bias=b, causal=causal)
    assert type(out.grad_fn).__name__ == "_EagerAttentionBackward"
    ref, _ = attn_forward(q, k, v, mask, b, 8.0, 1, causal, True, False, False)
    assert "_EagerAttention" not in type(ref.grad_fn).__name__
    assert torch.equal(out, ref)
    dout = torch.randn_like(out)
    for x, y in zip(torch.autograd.grad(out, (q, k, v, b), dout),
                    torch.autograd.grad(ref, (q, k, v, b), dout)):
        assert torch.equal(x, y)


def test_eager_backward_refuses_inputs_modified_in_place():
    q, k, v, _, _ = _inputs(bias=False)
    out = ca.flash_cosine_sim_attention(q, k, v)
    with torch.no_grad():
        k.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_no_grad_calls_record_no_graph():
    q, k, v, _, _ = _inputs(bias=False)
    with torch.no_grad():
        out = ca.flash_cosine_sim_attention(q, k, v)
    assert out.grad_fn is None and not out.requires_grad


def test_traced_calls_take_the_custom_op():
    q, k, v, _, _ = _inputs(seed=3, bias=False)
    graph = torch.fx.experimental.proxy_tensor.make_fx(
        lambda q, k, v: ca.flash_cosine_sim_attention(q, k, v), tracing_mode="fake")(q, k, v)
    assert "cupy_cosine_attn.forward" in str(graph.code)


@pytest.mark.parametrize("eager", [True, False])
def test_second_derivatives_raise(eager):
    """No second derivative is implemented: asking for one raises on both paths, never a silent
    zero contribution."""
    q, k, v, _, _ = _inputs(seed=4, bias=False)
    out = (ca.flash_cosine_sim_attention(q, k, v) if eager
           else attn_forward(q, k, v, None, None, 8.0, 1, False, True, False, False)[0])
    with pytest.raises(RuntimeError, match="differentiate twice|no autograd formula"):
        gq, = torch.autograd.grad(out.square().sum(), q, create_graph=True)
        (gq.sum() + v.sum()).backward()
