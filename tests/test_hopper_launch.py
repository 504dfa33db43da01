"""The Hopper launch layer on CPU: default variants, tuning knobs, shared-memory budgets."""
import pytest

from cupy_cosine_attn import hopper_launch as hl

KNOBS = ("CUPY_COSINE_ATTN_SM90_BN", "CUPY_COSINE_ATTN_SM90_WGS", "CUPY_COSINE_ATTN_SM90_QREG",
         "CUPY_COSINE_ATTN_SM90_TMA", "CUPY_COSINE_ATTN_SM90_RELEASE", "CUPY_COSINE_ATTN_SM90_WS",
         "CUPY_COSINE_ATTN_SM90_BWD_WGS", "CUPY_COSINE_ATTN_SM90_BWD_BM", "CUPY_COSINE_ATTN_SM90_DQ",
         "CUPY_COSINE_ATTN_SM90_BWD_OVERLAP", "CUPY_COSINE_ATTN_SM90_STAGGER")
SMEM_PER_BLOCK = 227 * 1024          # sm_90 opt-in maximum of dynamic shared memory per block


@pytest.fixture(autouse=True)
def no_knobs(monkeypatch):
    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def row_stats_calls(monkeypatch):
    """pack_row_stats without a GPU: records (lse, delta, heads, i, bm), returns a marker."""
    calls = []
    monkeypatch.setattr(hl, "pack_row_stats", lambda *a: calls.append(a) or "STATS")
    return calls


def bwd_args(h=1, i=64):
    """attn_bwd_kv_mma's 25 arguments with only what the launcher reads: lse, delta, h, i."""
    import numpy as np
    return ((None,) * 4 + ("LSE", "DELTA") + (None,) * 11 + (np.int32(h), None, np.int32(i))
            + (None,) * 5)


def test_default_variants_are_the_measured_ones():
    # d = 64 without a causal mask: three consumer warpgroups behind a producer (192 query rows)
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 128, 3, false, true, true, 1, false>"
    assert hl.sm90_ws(64, bias_mask=True) == 0
    # with a causal mask from WS3_MIN_KEYS_CAUSAL keys (or a long call, j = None); without one
    # from WS3_MIN_KEYS
    assert hl.sm90_ws(64, causal=True, j=hl.WS3_MIN_KEYS_CAUSAL - 1) == 0
    assert hl.sm90_ws(64, causal=True, j=hl.WS3_MIN_KEYS_CAUSAL) == 1 and hl.sm90_ws(64, causal=True) == 1
    assert hl.sm90_ws(64, j=hl.WS3_MIN_KEYS - 1) == 0 and hl.sm90_ws(64, j=hl.WS3_MIN_KEYS) == 1
    # d = 128: the warp-specialised forward (producer warpgroup, stage release)
    assert hl.forward_spec("__nv_bfloat16", 128).name == "attn_fwd_wgmma<128, __nv_bfloat16, 128, 2, false, true, true, 1, false>"
    # dQ by TMA reduce-add at d = 128 (overlap 2) and at d = 64 (128-query tiles, overlap 2 there:
    # each tile's dQ issued at the top of the next); vector reductions in the other d = 64 layouts
    assert hl.backward_spec("__half", 64).name == "attn_bwd_wgmma<64, __half, 3, 2, 128, true, 2>"
    assert hl.backward_spec("__half", 64, overlap=1).name == "attn_bwd_wgmma<64, __half, 4, 2, 128, true, 1>"
    assert hl.backward_spec("__half", 64, bm=64).name == "attn_bwd_wgmma<64, __half, 4, 2, 64, true, 1>"
    assert hl.backward_spec("__nv_bfloat16", 128).name == "attn_bwd_wgmma<128, __nv_bfloat16, 3, 2, 64, true, 2>"


def test_warp_specialisation_default_covers_d128_calls_without_bias_or_mask(monkeypatch):
    assert hl.sm90_ws(128) == 1 and hl.sm90_ws(64) == 1 and hl.sm90_ws(256) == 0
    # the bias/mask copy stays on the CTA-barrier forward (it spills under the WS register cap)
    assert hl.forward_spec("__half", 128, bias_mask=True).name == \
        "attn_fwd_wgmma<128, __half, 128, 2, false, true, true, 0, true>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_WGS", "1")     # a layout WS does not have: off
    assert hl.sm90_ws(128) == 0
    assert hl.forward_spec("__half", 128).name == "attn_fwd_wgmma<128, __half, 128, 1, false, true, false, 0, false>"
    monkeypatch.delenv("CUPY_COSINE_ATTN_SM90_WGS")
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_TMA", "0")
    assert hl.sm90_ws(128) == 0
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_WS", "1")      # an explicit knob still wins
    assert hl.sm90_ws(128) == 1


def test_backward_overlap_2_takes_a_third_stage_only_where_it_applies():
    assert hl.backward_stages(128, True, 2) == 3
    assert hl.backward_stages(128, False, 2) == hl.backward_stages(128, True, 1) == 2
    assert hl.backward_stages(64, True, 2) == hl.backward_stages(256, True, 2) == 2
    assert hl.backward_smem(128, 2, 64, 2) == hl.backward_smem(128, 2, 64, 1) + 2 * 64 * 128 * 2 + 1024 + 8
    # where it does not apply the spec names what runs: overlap 1
    assert hl.backward_spec("__half", 256, wgs=1, overlap=2) == hl.backward_spec("__half", 256, wgs=1, overlap=1)
    # d = 256 with two warpgroups: overlap 2 splits S^T and dP^T between them (a P^T tile more)
    assert hl.backward_spec("__half", 256, overlap=2).name.endswith(", true, 2>")
    assert hl.backward_smem(256, 2, 64, 2, True, 4) == hl.backward_smem(256, 2, 64, 1, True, 4) + 64 * 64 * 4
    # d = 64, two warpgroups, 128-query tiles: overlap 2 defers each tile's dQ to the next (a
    # second dS^T tile), with either loader; other d = 64 tiles run overlap 1
    assert hl.backward_spec("__half", 64, overlap=2).name.endswith(", true, 2>")
    assert hl.backward_spec("__half", 64, use_tma=False, overlap=2).name.endswith(", false, 2>")
    assert hl.backward_smem(64, 2, 128, 2) == hl.backward_smem(64, 2, 128, 1) + 128 * 128 * 2
    assert hl.backward_spec("__half", 64, wgs=1, bm=64, overlap=2).name.endswith(", 1>")
    assert hl.backward_spec("__half", 64, wgs=2, bm=64, overlap=2).name.endswith(", 1>")
    assert hl.backward_spec("__half", 128, use_tma=False, overlap=2).name.endswith(", false, 1>")


def test_calls_with_a_bias_or_mask_get_the_copy_built_for_them():
    import numpy as np
    assert hl.forward_spec("__half", 64, bias_mask=True).name == \
        "attn_fwd_wgmma<64, __half, 128, 1, false, true, false, 0, true>"
    assert hl._null(np.uint64(0)) and not hl._null(np.uint64(8)) and not hl._null(np.zeros(1))


def test_short_causal_calls_at_d128_use_the_small_tiles(monkeypatch):
    assert (hl.sm90_bn(128, 8192, True), hl.sm90_wgs(128, 8192, True)) == (64, 1)
    assert (hl.sm90_bn(128, 8193, True), hl.sm90_wgs(128, 8193, True)) == (128, 2)
    assert (hl.sm90_bn(128, 2048, False), hl.sm90_wgs(128, 2048, False)) == (128, 2)
    assert (hl.sm90_bn(64, 2048, True), hl.sm90_wgs(64, 2048, True)) == (128, 1)
    names = [s.name for s in hl.default_specs("__half", 128)]
    # without bias or mask the warp-specialised forward takes both tile shapes (two consumers)
    assert names == ["attn_fwd_wgmma<128, __half, 128, 2, false, true, true, 1, false>",
                     "attn_fwd_wgmma<128, __half, 64, 2, true, true, true, 1, false>",
                     "attn_fwd_wgmma<128, __half, 128, 2, false, true, true, 0, true>",
                     "attn_fwd_wgmma<128, __half, 64, 1, true, true, false, 0, true>",
                     "attn_bwd_wgmma<128, __half, 3, 2, 64, true, 2>"]
    # d = 64: three consumers without a causal mask, one warpgroup (two CTAs per SM) with one
    assert [s.name for s in hl.default_specs("__half", 64)][:2] == [
        "attn_fwd_wgmma<64, __half, 128, 3, false, true, true, 1, false>",
        "attn_fwd_wgmma<64, __half, 128, 1, false, true, false, 0, false>"]
    assert len(hl.default_specs("__half", 64)) == 4
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_BN", "128")     # a knob wins over the shape rule
    assert hl.sm90_bn(128, 2048, True) == 128


def test_every_default_is_among_the_compiled_variants():
    names = {s.name for s in hl.specs()}
    for ct in ("__half", "__nv_bfloat16"):
        for d in hl.SM90_HEAD_DIMS:
            for spec in hl.default_specs(ct, d):
                assert spec.name in names
            assert hl.backward_spec(ct, d).name in names


def test_knobs_select_variants(monkeypatch):
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_BN", "64")      # 64-key tiles: Q in registers
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 3, true, true, true, 1, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_WS", "0")       # the layout for causal calls
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 1, true, true, false, 0, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_QREG", "0")
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 1, false, true, false, 0, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_RELEASE", "1")
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 1, false, true, true, 0, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_TMA", "0")      # stage release needs TMA: ignored
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 1, false, false, false, 0, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_WS", "1")       # implies TMA, release, three consumers at d = 64
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 3, false, true, true, 1, false>"
    assert hl.forward_spec("__half", 128).name == "attn_fwd_wgmma<128, __half, 64, 2, false, true, true, 1, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_WGS", "2")
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 2, false, true, true, 1, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_WGS", "3")
    assert hl.forward_spec("__half", 128).name == "attn_fwd_wgmma<128, __half, 64, 3, false, true, true, 1, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_WS", "2")       # ping-pong: two consumers only
    with pytest.raises(ValueError, match="two consumer warpgroups, not 3"):
        hl.forward_spec("__half", 64)
    monkeypatch.delenv("CUPY_COSINE_ATTN_SM90_WGS")
    assert hl.forward_spec("__half", 64).name == "attn_fwd_wgmma<64, __half, 64, 2, false, true, true, 2, false>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_BWD_WGS", "1")
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_DQ", "0")
    # one warpgroup: only the 64-query tile exists
    assert hl.backward_spec("__half", 64).name == "attn_bwd_wgmma<64, __half, 0, 1, 64, false, 1>"
    # d = 128 keeps two warpgroups and whole-row dQ blocks fall back to rows
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_DQ", "2")
    assert hl.backward_spec("__half", 128).name == "attn_bwd_wgmma<128, __half, 1, 2, 64, false, 1>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_TMA", "1")
    assert hl.backward_spec("__half", 128).name == "attn_bwd_wgmma<128, __half, 1, 2, 64, true, 2>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_TMA", "0")
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_DQ", "3")
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_BWD_OVERLAP", "1")
    assert hl.backward_spec("__half", 128).name == "attn_bwd_wgmma<128, __half, 3, 2, 64, false, 1>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_BWD_OVERLAP", "0")
    assert hl.backward_spec("__half", 128).name == "attn_bwd_wgmma<128, __half, 3, 2, 64, false, 0>"


@pytest.mark.parametrize("name", KNOBS)
@pytest.mark.parametrize("value", ["96", "abc", "-1", "1.5"])
def test_bad_knob_values_are_refused_by_name(monkeypatch, name, value):
    import numpy as np
    monkeypatch.setenv(name, value)
    monkeypatch.setattr(hl, "get_function", lambda spec: pytest.fail("compiled"))
    if name != "CUPY_COSINE_ATTN_SM90_STAGGER":
        with pytest.raises(ValueError, match=name):      # a knob of either kernel's variant
            hl.forward_spec("__half", 64)
            hl.forward_spec("__half", 64, ws=0)         # the knobs the warp-specialised layout fixes
            hl.backward_spec("__half", 64)
    else:                                            # a launch argument of both: refused before launching
        fwd_args = (None,) * 12 + (np.int32(1), np.int32(1), np.int32(64), np.int32(0), np.int32(0))
        with pytest.raises(ValueError, match=name):
            hl.launch("__half", 64, fwd_args, 1, 1, 64)
        with pytest.raises(ValueError, match=name):
            hl.launch_backward("__half", 64, bwd_args(), 1, 1, 64)


def test_stagger_is_a_launch_argument_of_both_kernels(monkeypatch):
    import numpy as np
    launched = []

    class Fn:
        def __call__(self, grid, block, args, shared_mem=0):
            launched.append(args[-1])

    monkeypatch.setattr(hl, "get_function", lambda spec: Fn())
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_TMA", "0")     # no tensor maps (no driver here)
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_DQ", "1")
    fwd_args = (None,) * 12 + (np.int32(1), np.int32(1), np.int32(64), np.int32(0), np.int32(0))
    for value in (None, "0", "1"):
        if value is None:
            monkeypatch.delenv("CUPY_COSINE_ATTN_SM90_STAGGER", raising=False)
        else:
            monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_STAGGER", value)
        hl.launch("__half", 64, fwd_args, 1, 1, 64)
        hl.launch_backward("__half", 64, bwd_args(), 1, 1, 64)
    assert [int(a) for a in launched] == [0, 0, 0, 0, 1, 1]      # off unless asked for
    assert all(isinstance(a, np.int32) for a in launched)


def test_d64_forward_launch_layouts(monkeypatch):
    """Without a causal mask, bias or key mask, from 4096 keys on: 192 query rows per CTA, a
    producer and three consumer warpgroups (512 threads); otherwise one 64-row warpgroup per CTA."""
    import numpy as np
    from types import SimpleNamespace
    launched = []

    class Fn:
        def __call__(self, grid, block, args, shared_mem=0):
            launched.append((name, grid, block, shared_mem))

    def get_function(spec):
        nonlocal name
        name = spec.name
        return Fn()
    name = None
    monkeypatch.setattr(hl, "get_function", get_function)
    monkeypatch.setattr(hl.tma, "rows_map", lambda *a: "MAP")      # no driver here
    kv = SimpleNamespace(data=SimpleNamespace(ptr=0))
    for causal, bias, j in ((0, 0, 4096), (1, 0, 4096), (0, 8, 4096), (0, 0, 4095)):
        args = ((None, kv, kv, np.uint64(bias), np.uint64(0)) + (None,) * 7
                + (np.int32(2), np.int32(1000), np.int32(j), np.int32(64), np.int32(causal)))
        hl.launch("__half", 64, args, 2, 4, 1000)
    assert launched[0] == ("attn_fwd_wgmma<64, __half, 128, 3, false, true, true, 1, false>",
                           (2 * 4 * 6,), (512,), hl.forward_smem(64, 128, 3, ws=True))
    assert launched[1][0] == "attn_fwd_wgmma<64, __half, 128, 1, false, true, false, 0, false>"
    assert launched[1][1:3] == ((2 * 4 * 16,), (128,))
    assert launched[2][0] == "attn_fwd_wgmma<64, __half, 128, 1, false, true, false, 0, true>"
    # fewer keys than WS3_MIN_KEYS: the one-warpgroup layout (measured faster there)
    assert hl.WS3_MIN_KEYS == 4096
    assert launched[3][0] == launched[1][0] and launched[3][1:3] == ((2 * 4 * 16,), (128,))


def test_every_variant_fits_in_shared_memory():
    for d in hl.TUNED_HEAD_DIMS:
        for bn in (64, 128):
            for wgs in (1, 2):
                assert hl.forward_smem(d, bn, wgs) <= SMEM_PER_BLOCK, (d, bn, wgs)
            assert hl.forward_smem(d, bn, 2, ws=True) <= SMEM_PER_BLOCK, (d, bn, "ws")
        assert hl.forward_smem(d, 64, 3, ws=True) <= SMEM_PER_BLOCK, (d, "ws3")
    assert hl.forward_smem(64, 128, 3, ws=True) <= SMEM_PER_BLOCK
    for d in hl.SM90_HEAD_DIMS:
        for wgs, bm in hl.BWD_TILES[d]:
            for overlap in (0, 1, 2):
                for dq in (0, 1, 2, 3, 4):     # as the variant runs it (d = 256, two warpgroups: 4)
                    run = hl._bwd_config(d, dq, wgs, bm, True, overlap)
                    assert hl.backward_smem(d, wgs, bm, run[4], True, run[0]) <= SMEM_PER_BLOCK, (d, wgs, bm, overlap, dq)


def test_one_warpgroup_defaults_leave_room_for_two_ctas_per_sm():
    # the forward's one-warpgroup CTAs rely on a second CTA per SM to hide their phases
    for d in hl.SM90_HEAD_DIMS:
        for j, causal in ((16384, False), (2048, True)):
            if hl.sm90_wgs(d, j, causal) == 1:
                assert 2 * (hl.forward_smem(d, hl.sm90_bn(d, j, causal), 1) + 1024) <= 228 * 1024


def test_d256_runs_the_hopper_kernels_with_the_backward_split_in_column_halves(monkeypatch):
    assert 256 in hl.SM90_HEAD_DIMS
    assert hl.forward_spec("__half", 256).name == "attn_fwd_wgmma<256, __half, 64, 2, false, true, false, 0, false>"
    assert hl.forward_smem(256, 64, 2) <= SMEM_PER_BLOCK
    # two warpgroups, a column half each, S^T and dP^T split between them (overlap 2), dQ by
    # vector reductions (no room to stage it)
    assert hl.backward_spec("__half", 256).name == "attn_bwd_wgmma<256, __half, 4, 2, 64, true, 2>"
    assert hl.backward_smem(256, 2, 64, dq=4) <= SMEM_PER_BLOCK < hl.backward_smem(256, 2, 64, dq=3)
    assert hl.backward_keys_per_cta(256, 2) == 64 and hl.backward_keys_per_cta(128, 2) == 128
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_DQ", "0")
    assert hl.backward_spec("__half", 256).name == "attn_bwd_wgmma<256, __half, 0, 2, 64, true, 2>"
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_BWD_WGS", "1")   # a CTA per column half
    monkeypatch.delenv("CUPY_COSINE_ATTN_SM90_DQ")
    assert hl.backward_spec("__half", 256).name == "attn_bwd_wgmma<256, __half, 3, 1, 64, true, 1>"
    assert hl.backward_smem(256, 1, 64) <= SMEM_PER_BLOCK
    monkeypatch.delenv("CUPY_COSINE_ATTN_SM90_BWD_WGS")
    assert hl.backward_column_splits(256, 1) == 2 and hl.backward_column_splits(256, 2) == 1
    assert hl.backward_column_splits(128, 2) == 1
    assert hl.backward_column_splits(256) == 1 and hl.backward_column_splits(128) == 1   # default layouts
    assert [s.name for s in hl.default_specs("__half", 256)] == [
        hl.forward_spec("__half", 256).name, hl.forward_spec("__half", 256, bias_mask=True).name,
        hl.backward_spec("__half", 256).name]
    names = {s.name for s in hl.specs()}
    assert {s.name for s in hl.default_specs("__half", 256)} <= names


def test_backward_grid_has_a_column_split_axis_at_d256(monkeypatch):
    launches = []

    class Fn:
        def __call__(self, grid, block, args, shared_mem=0):
            launches.append((grid, block, shared_mem))

    monkeypatch.setattr(hl, "get_function", lambda spec: Fn())
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_TMA", "0")     # no tensor maps (no driver here)
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_DQ", "1")
    for d in (128, 256):
        hl.launch_backward("__half", d, bwd_args(3, 130), 2, 3, 130)
    hl.launch_backward("__half", 256, bwd_args(3, 130), 2, 3, 130, wgs=1)
    assert launches[0][:2] == ((2 * 3 * 2, 1), (256,))      # 128 keys per CTA, two warpgroups
    assert launches[1][:2] == ((2 * 3 * 3, 1), (256,))      # 64 keys per CTA, a warpgroup per column half
    assert launches[1][2] == hl.backward_smem(256, 2, 64, overlap=2, dq=4)
    assert launches[2][:2] == ((2 * 3 * 3, 2), (128,))      # 64 keys per CTA, two column halves
    assert launches[2][2] == hl.backward_smem(256, 1, 64, dq=1)


def test_knobs_that_overflow_shared_memory_are_refused_before_compiling(monkeypatch):
    import numpy as np
    monkeypatch.setattr(hl, "get_function", lambda spec: pytest.fail("compiled"))
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_BN", "128")
    args = (None,) * 12 + (np.int32(1), np.int32(1), np.int32(4096), np.int32(0), np.int32(0))
    with pytest.raises(ValueError, match="CUPY_COSINE_ATTN_SM90_BN"):
        hl.launch("__half", 256, args, 1, 1, 4096)


def test_backward_gets_row_statistics_in_place_of_lse_and_delta(monkeypatch, row_stats_calls):
    """The kernel takes one padded statistics array (per tile of its query rows) where the sm_80
    kernels take lse and delta: 24 arguments, then three tensor maps and the stagger."""
    launched = []

    class Fn:
        def __call__(self, grid, block, args, shared_mem=0):
            launched.append(args)

    monkeypatch.setattr(hl, "get_function", lambda spec: Fn())
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_TMA", "0")     # no tensor maps (no driver here)
    monkeypatch.setenv("CUPY_COSINE_ATTN_SM90_DQ", "1")
    for d, bm in ((64, 128), (128, 64), (256, 64)):
        hl.launch_backward("__half", d, bwd_args(3, 130), 2, 3, 130)
        assert row_stats_calls[-1] == ("LSE", "DELTA", 2 * 3, 130, bm)
        args = launched[-1]
        assert len(args) == 24 + 3 + 1
        assert [a for a in args if isinstance(a, str)] == ["STATS"] and args[4] == "STATS"
