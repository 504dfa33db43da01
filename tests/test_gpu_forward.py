"""GPU forward kernels against the float64 definition, with NaN-poisoned outputs.

fp32 must reach 1e-5 relative-norm error; fp16/bf16 no worse than 1.5x the error PyTorch's SDPA
shows on the same inputs and dtype (same normalised q, k, same scale, same visibility).
"""
import os

import pytest

from gpu_support import lean_hopper_cases, require_gpu

pytestmark = pytest.mark.gpu
require_gpu()

import torch  # noqa: E402

import cupy_cosine_attn as ca  # noqa: E402
from helpers import ForeignDLPack, rel_err, sdpa_same_problem, truth  # noqa: E402

DEV = "cuda"
os.environ["CUPY_COSINE_ATTN_POISON"] = "1"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FLOOR = {"float16": 1e-3, "bfloat16": 8e-3}


def sdpa_error(q, k, v, ref, mask, bias, scale, groups, causal, bbd):
    """Relative error of torch SDPA on the same problem in the same dtype (rows that see keys)."""
    return rel_err(sdpa_same_problem(q, k, v, mask, bias, scale, groups, causal, bbd), ref)


CASES = [
    dict(i=128, j=128),
    dict(i=1, j=77),
    dict(i=77, j=200, causal=True),
    dict(i=200, j=77, causal=True),           # rows that see no key
    dict(i=333, j=333, causal=True, mask=True),
    dict(i=65, j=130, mask=True),
    dict(i=100, j=150, bias="heads"),
    dict(i=100, j=150, bias="batch", causal=True),
    dict(i=64, j=64, bias="full"),
    dict(i=90, j=90, hk=1),
    dict(i=90, j=190, hk=2, causal=True),
    dict(i=130, j=70, groups=2),
    dict(i=130, j=170, l2norm=False),
    dict(i=129, j=129, groups=8, scale=16.0),  # online softmax variant
    dict(i=700, j=1100, causal=True, hk=2),     # many key tiles through the stage rings
]


def run_case(dtype_name, d, i, j, causal=False, mask=False, bias=None, hk=4, groups=1,
             l2norm=True, scale=8.0, seed=0):
    dt = DTYPES[dtype_name]
    g = torch.Generator(device=DEV).manual_seed(seed)
    b, h = 2, 4
    q = torch.randn(b, h, i, d, device=DEV, generator=g)
    k = torch.randn(b, hk, j, d, device=DEV, generator=g)
    v = torch.randn(b, hk, j, d, device=DEV, generator=g)
    if not l2norm:
        q, k = ca.l2norm_tensors(q, k, groups=groups)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    m = (torch.rand(b, j, device=DEV, generator=g) > 0.3) if mask else None
    bb = None
    bbd = bias == "batch"
    if bias:
        shape = {"heads": (h, i, j), "batch": (b, i, j), "full": (b, h, i, j)}[bias]
        bb = torch.randn(*shape, device=DEV, generator=g).to(dt)
    out, lse = ca.forward(q, k, v, mask=m, attn_bias=bb, scale=scale, groups=groups,
                          causal=causal, l2norm_qk=l2norm, attn_bias_batch_dim=bbd)
    ref, ref_lse = truth(q, k, v, m, bb, scale, groups, causal, l2norm, bbd)
    assert out.dtype == dt and out.shape == q.shape and lse.dtype == torch.float32
    assert torch.isfinite(out).all(), "NaN/inf in output (unwritten element?)"
    assert not torch.isnan(lse).any(), "NaN in lse (unwritten element?)"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without keys differ"
    fin = torch.isfinite(ref_lse)
    lse_err = (lse.double()[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
    err = rel_err(out, ref)
    if dtype_name == "float32":
        assert err <= 1e-5, err
        assert lse_err <= 1e-4, lse_err
    else:
        base = sdpa_error(q, k, v, ref, m, bb, scale, groups, causal, bbd)
        bound = max(1.5 * base, FLOOR[dtype_name])
        assert err <= bound, (err, base)
        # q, k are rounded to the dtype after normalisation: logits move by up to B * eps
        eps = 2.0 ** (-8 if dtype_name == "bfloat16" else -11)
        assert lse_err <= max(2e-2, 0.5 * scale * groups * eps), lse_err
    return err


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forward_features(dtype_name, case):
    run_case(dtype_name, 64, **case)


@lean_hopper_cases
def test_forward_without_mask_or_bias_at_every_hopper_head_dim(dtype_name, d, case):
    run_case(dtype_name, d, **case)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [16, 24, 32, 40, 64, 80, 96, 128, 160, 192, 256])
def test_forward_head_dims(dtype_name, d):
    run_case(dtype_name, d, 150, 190, causal=True, mask=True, bias="heads", hk=2)


# Forward layouts chosen by the tuning knobs beside the defaults: three consumer warpgroups
# (192 query rows; the d = 64 default from 4096 keys on, which these short cases reach only by
# the knob) with 128- and 64-key tiles, Q in registers or not, also at d = 128; the one-warpgroup
# layout (the d = 64 default below 4096 keys); the stagger with three consumers.
LAYOUTS = {
    "ws3": (64, dict(WS="1")),
    "ws3-bn64": (64, dict(WS="1", WGS="3", BN="64")),
    "ws3-bn64-qsmem": (64, dict(WS="1", WGS="3", BN="64", QREG="0")),
    "ws3-d128-bn64": (128, dict(WS="1", WGS="3", BN="64")),
    "one-wg": (64, dict(WS="0")),
    "ws3-stagger": (64, dict(WS="1", STAGGER="1")),
}
LAYOUT_CASES = [dict(i=1000, j=1000), dict(i=193, j=300, hk=2), dict(i=191, j=1100, causal=True),
                dict(i=50, j=700)]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
def test_d64_forward_with_many_keys_takes_three_consumers_by_default(dtype_name):
    from cupy_cosine_attn import hopper_launch
    assert hopper_launch.sm90_ws(64, causal=False, j=4100) == 1
    run_case(dtype_name, 64, 400, 4100, hk=2)
    # with a causal mask from 12288 keys on (fewer queries than keys: the last rows see them all)
    assert hopper_launch.sm90_ws(64, causal=True, j=12300) == 1
    run_case(dtype_name, 64, 300, 12300, causal=True)


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_forward_layouts_chosen_by_knobs(monkeypatch, dtype_name, layout, case):
    d, knobs = LAYOUTS[layout]
    for name, value in knobs.items():
        monkeypatch.setenv(f"CUPY_COSINE_ATTN_SM90_{name}", value)
    run_case(dtype_name, d, **case)


# (d, groups) reaching each layout of the normalisation passes (gpu_launch.row_v8_layout):
# 8 elements per thread with idle lanes (24, 40), group sums over 4 and 1 lanes (128/4, 64/8),
# 32 lanes per row (256), and the one-warp-per-row kernels (a group of 24 or 4 elements).
GROUP_LAYOUTS = [(24, 1), (40, 1), (128, 4), (64, 8), (256, 1), (96, 4), (64, 16)]


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float32"])
@pytest.mark.parametrize("d, groups", GROUP_LAYOUTS)
def test_forward_normalisation_layouts(dtype_name, d, groups):
    run_case(dtype_name, d, 70, 90, causal=True, groups=groups, scale=4.0)


def test_unsupported_head_dim_is_a_clear_error():
    q = torch.randn(1, 1, 8, 20, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="head dim d=20"):
        ca.forward(q, q, q)
    q = torch.randn(1, 1, 8, 264, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiples of 8"):
        ca.forward(q, q, q)


def test_merged_and_single_head_layouts():
    g = torch.Generator(device=DEV).manual_seed(1)
    q = torch.randn(6, 100, 64, device=DEV, generator=g, dtype=torch.float16)
    k = torch.randn(6, 120, 64, device=DEV, generator=g, dtype=torch.float16)
    out = ca.flash_cosine_sim_attention(q, k, k, causal=True)
    assert rel_err(out, truth(q, k, k, causal=True)[0]) < 2e-3
    q4 = torch.randn(2, 3, 100, 64, device=DEV, generator=g, dtype=torch.bfloat16)
    k3 = torch.randn(2, 120, 64, device=DEV, generator=g, dtype=torch.bfloat16)
    out = ca.flash_cosine_sim_attention(q4, k3, k3)
    assert rel_err(out, truth(q4, k3, k3)[0]) < 1e-2


def test_zero_size_and_no_keys():
    q = torch.randn(2, 2, 5, 64, device=DEV, dtype=torch.float16)
    k = torch.randn(2, 2, 0, 64, device=DEV, dtype=torch.float16)
    out, lse = ca.forward(q, k, k)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = ca.forward(q[:0], q[:0], q[:0])
    assert out.shape == (0, 2, 5, 64)


def test_non_contiguous_and_cupy_inputs():
    import cupy
    g = torch.Generator(device=DEV).manual_seed(2)
    q = torch.randn(2, 50, 3, 64, device=DEV, generator=g, dtype=torch.float16).transpose(1, 2)
    out, _ = ca.forward(q, q, q, causal=True)
    assert rel_err(out, truth(q, q, q, causal=True)[0]) < 2e-3
    qc = cupy.asarray(q.float().contiguous().cpu().numpy())
    out_c, lse_c = ca.forward(qc, qc, qc, causal=True)
    assert isinstance(out_c, cupy.ndarray)
    ref = truth(q.float(), q.float(), q.float(), causal=True)[0]
    assert rel_err(torch.as_tensor(cupy.asnumpy(out_c)), ref.cpu()) < 1e-5


def test_large_offsets_beyond_2_31_elements():
    """v with more than 2^31 elements: 64-bit offsets in every kernel."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs ~24 GiB of free GPU memory")
    b, h, d = 1, 1, 64
    n = 2**25 + 64                                        # q and out: 2^31 + 4096 elements
    q = torch.randn(b, h, n, d, device=DEV, dtype=torch.float16)
    k = q[:, :, :4096].contiguous()
    v = torch.randn(b, h, 4096, d, device=DEV, dtype=torch.float16)
    out, lse = ca.forward(q, k, v)
    tail = slice(n - 100, n)
    ref = truth(q[:, :, tail], k, v)[0]
    assert rel_err(out[:, :, tail], ref) < 2e-3



def test_hopper_path_is_chosen_on_hopper():
    """On a compute-capability 9.0 GPU, fp16/bf16 at d = 64 and 128 run the wgmma kernels."""
    import cupy
    from cupy_cosine_attn import gpu_launch, hopper_launch
    on_hopper = cupy.cuda.Device().compute_capability == "90"
    for dt in ("float16", "bfloat16"):
        for d in (64, 128):
            assert gpu_launch.kernel_path(dt, d) == ("sm90-wgmma" if on_hopper else "sm80-mma")
            assert hopper_launch.covers_backward(dt, d, deterministic=False) == on_hopper
            assert not hopper_launch.covers_backward(dt, d, deterministic=True)
        assert gpu_launch.kernel_path(dt, 96) == "sm80-mma"


def test_foreign_dlpack_cuda_arrays_come_back_as_cupy():
    """Arrays of any library that speaks DLPack on a CUDA device run on the GPU kernels."""
    import cupy

    g = torch.Generator(device=DEV).manual_seed(3)
    q, k, v = (torch.randn(1, 2, 70, 64, device=DEV, generator=g, dtype=torch.float16) for _ in range(3))
    out, lse = ca.forward(ForeignDLPack(q), ForeignDLPack(k), ForeignDLPack(v), causal=True)
    assert isinstance(out, cupy.ndarray) and isinstance(lse, cupy.ndarray)
    ref, _ = ca.forward(q, k, v, causal=True)
    assert torch.equal(torch.from_dlpack(out), ref)
