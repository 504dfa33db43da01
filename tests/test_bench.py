"""Benchmark machinery: FLOP counts, the JSON schema, refusals shown as n/a, the float64 check."""
import json
import math

import numpy as np
import pytest
import torch

from cupy_cosine_attn import bench
from cupy_cosine_attn.bench import Case, Contender, NotApplicable


def brute_pairs(i, j, causal, mask=None):
    """Visible (row, key) pairs counted one by one from the definition in docs/semantics.md."""
    masks = [np.ones(j, bool)] if mask is None else list(mask)
    total = 0
    for m in masks:
        for r in range(i):
            for c in range(j):
                if m[c] and (not causal or c <= r + (j - i)):
                    total += 1
    return total


# ----------------------------------------------------------------------------------------------
# FLOP counts
# ----------------------------------------------------------------------------------------------

def test_dense_flops():
    assert bench.visible_pairs(7, 11) == 77
    assert bench.forward_flops(2, 3, 7, 11, 64) == 4 * 2 * 3 * 7 * 11 * 64


def test_causal_square_is_triangle():
    n = 100
    assert bench.visible_pairs(n, n, causal=True) == n * (n + 1) // 2
    assert bench.forward_flops(1, 1, n, n, 8, causal=True) == 4 * 8 * n * (n + 1) // 2


@pytest.mark.parametrize("i,j", [(3, 5), (5, 3), (1, 9), (9, 1), (16, 16), (4, 0)])
def test_causal_bottom_right_both_ways(i, j):
    assert bench.visible_pairs(i, j, causal=True) == brute_pairs(i, j, True)


def test_causal_more_queries_than_keys_hides_leading_rows():
    # i=5, j=3: rows 0 and 1 see nothing, rows 2, 3, 4 see 1, 2, 3 keys.
    assert bench.visible_pairs(5, 3, causal=True) == 6
    # i=3, j=5: rows see 3, 4, 5 keys.
    assert bench.visible_pairs(3, 5, causal=True) == 12


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("i,j", [(6, 6), (4, 9), (9, 4)])
def test_masked_counts_exactly_the_visible_pairs(i, j, causal):
    rng = np.random.default_rng(i * 31 + j + causal)
    mask = rng.random((3, j)) < 0.4
    mask[1] = False                    # a fully masked batch contributes nothing
    want = brute_pairs(i, j, causal, mask)
    assert bench.visible_pairs(i, j, causal, mask) == want
    d, h = 32, 5
    # with a mask the batch is the mask's: no extra factor b
    assert bench.forward_flops(3, h, i, j, d, causal, mask) == 4 * d * h * want


def test_mode_factors():
    fwd = bench.forward_flops(2, 4, 128, 256, 64, causal=True)
    assert bench.mode_flops(fwd, "fwd") == fwd
    assert bench.mode_flops(fwd, "bwd") == int(round(2.5 * fwd))
    assert bench.mode_flops(fwd, "fwdbwd") == int(round(3.5 * fwd))


# ----------------------------------------------------------------------------------------------
# A tiny suite, shared by the tests below
# ----------------------------------------------------------------------------------------------

TINY = Case(dtype="float32", d=16, b=1, h=2, hk=1, i=24, j=32, causal=True, mask_density=0.7,
            bias=True, groups=2)


def _refuser(case, inputs, device):
    raise NotApplicable("head dim 16 is not supported by this contender")


def _crasher(case, inputs, device):
    def fn(q, k, v, bias=None):
        raise RuntimeError("No kernel for this case\nsecond line")
    return fn


def _wrong(case, inputs, device):
    def fn(q, k, v, bias=None):
        return torch.zeros(q.shape, dtype=q.dtype) + 1.0
    return fn


@pytest.fixture(scope="module")
def tiny_doc():
    names = [c.name for c in bench.contenders_for("cpu")]
    cases = [TINY, Case(dtype="float32", d=16, b=2, h=2, hk=2, i=20, j=20)]
    return bench.run_suite(cases, ["fwd", "bwd", "fwdbwd"], "cpu", repeats=3, warmup=1,
                           budget_s=0.05, contender_names=names)


def test_suite_document_matches_schema(tiny_doc):
    assert bench.validate_json(tiny_doc) == []
    text = json.dumps(tiny_doc, allow_nan=False)        # strict JSON: no NaN or inf
    assert bench.validate_json(json.loads(text)) == []


def test_suite_rows_complete_and_correct(tiny_doc):
    rows = tiny_doc["results"]
    assert len(rows) == 2 * 3 * len(tiny_doc["settings"]["contenders"])
    assert {r["contender"] for r in rows} >= {bench.OURS, "sdpa", bench.PLAIN}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["rel_err"] is not None and r["rel_err"] < 1e-5, r
        assert r["time_ms"] > 0 and r["tflops"] > 0 and r["peak_mem_bytes"] >= 0
        case = Case(**{k: r[k] for k in Case.__dataclass_fields__})
        assert r["flops"] > 0
        if case.mask_density is None:
            fwd = bench.forward_flops(case.b, case.h, case.i, case.j, case.d, case.causal)
            assert r["flops"] == bench.mode_flops(fwd, r["mode"])
        assert r["tflops"] == pytest.approx(r["flops"] / (r["time_ms"] * 1e-3) / 1e12)
    ours = [r for r in rows if r["contender"] == bench.OURS]
    assert all(r["ratio_vs_best_other"] > 0 for r in ours)
    assert all(r["ratio_vs_best_other"] is None for r in rows if r["contender"] != bench.OURS)


def test_schema_catches_problems(tiny_doc):
    doc = json.loads(json.dumps(tiny_doc))
    del doc["results"][0]["time_ms"]
    doc["results"][1]["causal"] = "yes"
    doc["results"][2]["status"] = "fine"
    doc["env"].pop("torch")
    problems = bench.validate_json(doc)
    text = "\n".join(problems)
    assert "missing key 'time_ms'" in text
    assert "results[1].causal" in text
    assert "results[2].status" in text
    assert "env: missing key 'torch'" in text
    assert bench.validate_json({"schema": "x"}) != []


def test_environment_header_in_every_output(tiny_doc, tmp_path):
    table = bench.format_table(tiny_doc)
    assert table.startswith("# package")
    assert "timing:" in table and "memory:" in table
    bench.write_csv(tiny_doc, tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("# package_version:")
    header = next(line for line in lines if not line.startswith("#"))
    assert header.split(",") == bench.CSV_COLUMNS
    bench.write_json(tiny_doc, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["env"]["device"] == "cpu"


def test_refusing_and_failing_contenders_show_na(tmp_path):
    from cupy_cosine_attn.bench import Timer
    contenders = [Contender(bench.OURS, bench._make_ours, is_ours=True),
                  Contender("refuses", _refuser), Contender("crashes", _crasher),
                  Contender("wrong", _wrong)]
    rows = bench.run_case(TINY, ["fwd", "fwdbwd"], contenders, "cpu", Timer("cpu"), repeats=3,
                          warmup=1, budget_s=0.05)
    by = {(r["contender"], r["mode"]): r for r in rows}
    assert by["refuses", "fwd"]["status"] == "n/a"
    assert "head dim 16" in by["refuses", "fwdbwd"]["reason"]
    assert by["crashes", "fwd"]["status"] == "n/a"
    assert by["crashes", "fwd"]["reason"] == "RuntimeError: No kernel for this case"
    # a contender that runs but computes something else gets a large error, not a pass
    assert by["wrong", "fwd"]["status"] == "ok" and by["wrong", "fwd"]["rel_err"] > 0.5
    # n/a rows do not count as "best other"; "wrong" is the only other timed contender
    ours = by[bench.OURS, "fwd"]
    assert ours["ratio_vs_best_other"] == pytest.approx(by["wrong", "fwd"]["time_ms"]
                                                        / ours["time_ms"])
    doc = {"schema": bench.SCHEMA_NAME, "env": bench.environment("cpu"),
           "settings": {"device": "cpu", "modes": ["fwd"], "repeats": 3, "warmup": 1,
                        "contenders": ["x"], "scale": 8.0}, "results": rows}
    assert bench.validate_json(doc) == []
    assert "n/a: head dim 16 is not supported" in bench.format_table(doc)


def test_plain_skipped_when_it_would_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "_available_bytes", lambda device: 1 << 20)
    case = Case(dtype="float32", d=16, b=1, h=1, hk=1, i=1024, j=1024)
    with pytest.raises(NotApplicable, match="GiB"):
        bench._make_plain(case, None, "cpu")


def test_float64_reference_samples_large_cases():
    case = Case(dtype="float32", d=8, b=3, h=4, hk=2, i=2500, j=40, causal=True)
    inputs = bench.Inputs(case, "cpu")
    ref = bench.Float64Reference(case, inputs)
    assert len(ref.pairs) == bench.CORRECTNESS_MAX_SLICES
    assert len(ref.rows) == bench.CORRECTNESS_MAX_ROWS
    import cupy_cosine_attn as ca
    out = ca.plain_cosine_sim_attention(inputs.q.double(), inputs.k.double(), inputs.v.double(),
                                        causal=True)
    assert ref.rel_err(out) < 1e-12
    assert ref.rel_err(out * 1.01) == pytest.approx(0.01, rel=1e-6)


def test_plot_needs_matplotlib_or_writes_png(tiny_doc, tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="matplotlib"):
            bench.plot(tiny_doc, tmp_path / "p.png")
        return
    bench.plot(tiny_doc, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_case_label_and_dtype_aliases():
    assert TINY.label() == "fp32 d16 b1 h2/1 i24j32 causal mask0.7 bias g2"
    assert bench.DTYPE_ALIASES["bf16"] == "bfloat16"
    assert not math.isnan(bench.MODE_FACTOR["bwd"])


def test_sdpa_refusal_reason_keeps_the_specific_warning():
    class W:
        def __init__(self, message):
            self.message = message
    caught = [W("Memory efficient kernel not used because: (Triggered internally at x.cpp:1.)"),
              W("Memory Efficient attention has been runtime disabled. (Triggered internally)"),
              W("Flash attention does not support non-null attn_mask. (Triggered internally)")]
    assert bench._warning_reason(caught) == "Flash attention does not support non-null attn_mask."
    assert bench._warning_reason(caught[:2]) is None
