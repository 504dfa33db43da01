"""The command line: argument parsing, the default suites, and `bench` end to end on a tiny CPU case."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cupy_cosine_attn import bench, cli

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_bench_arguments_parse():
    a = parse("bench", "--dtype", "bf16,fp16,fp32", "--d", "64,128", "--n", "1024,4096",
              "--causal", "both", "--mode", "fwd,bwd,fwdbwd", "--json", "o.json", "--plot", "o.png",
              "--mask-density", "0.5", "--bias", "--groups", "2", "--hk", "2", "--h", "8")
    assert a.command == "bench"
    assert a.dtype == ["bfloat16", "float16", "float32"]
    assert a.d == [64, 128] and a.n == [1024, 4096]
    assert a.causal == "both" and a.mode == ["fwd", "bwd", "fwdbwd"]
    assert a.json == "o.json" and a.plot == "o.png"
    assert a.mask_density == 0.5 and a.bias and a.groups == 2 and a.hk == 2 and a.h == 8


@pytest.mark.parametrize("argv", [
    ["bench", "--dtype", "int8"],
    ["bench", "--mode", "sideways"],
    ["bench", "--n", "0"],
    ["bench", "--n", "abc"],
    ["bench", "--causal", "maybe"],
    ["bench", "--mask-density", "1.5"],
    ["bench", "--b", "2,3"],
    ["frobnicate"],
    [],
])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2


def test_cpu_default_suite_is_small():
    cases, modes = cli.build_cases(parse("bench"), "cpu")
    assert modes == ["fwd", "fwdbwd"]
    assert {c.dtype for c in cases} == {"float32"} and {c.d for c in cases} == {64}
    assert sorted({c.i for c in cases}) == [256, 512, 1024]
    assert {c.causal for c in cases} == {False, True}
    assert len(cases) == 6


def test_gpu_default_suite_shapes():
    cases, _ = cli.build_cases(parse("bench"), "cuda")
    for c in cases:
        assert c.b * c.i == 32768 and c.h * c.d == 2048 and c.hk == c.h
    assert {c.dtype for c in cases} == {"bfloat16", "float16"}


def test_query_and_key_lengths_pair_up():
    cases, _ = cli.build_cases(parse("bench", "--i", "64,128", "--j", "256", "--causal", "yes"),
                               "cpu")
    assert [(c.i, c.j) for c in cases] == [(64, 256), (128, 256)]
    with pytest.raises(cli.UsageError):
        cli.build_cases(parse("bench", "--i", "1,2", "--j", "3,4,5"), "cpu")
    with pytest.raises(cli.UsageError):
        cli.build_cases(parse("bench", "--n", "64", "--i", "32"), "cpu")


def test_inconsistent_heads_and_groups_are_usage_errors():
    with pytest.raises(cli.UsageError, match="divide"):
        cli.build_cases(parse("bench", "--h", "6", "--hk", "4"), "cpu")
    with pytest.raises(cli.UsageError, match="groups"):
        cli.build_cases(parse("bench", "--d", "64", "--groups", "3"), "cpu")
    with pytest.raises(cli.UsageError, match="CPU dtype"):
        cli.build_cases(parse("bench", "--dtype", "fp64"), "cuda")


def test_bench_end_to_end_tiny_cpu(tmp_path, capsys):
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    rc = cli.main(["bench", "--device", "cpu", "--n", "64", "--d", "32", "--h", "2",
                   "--causal", "both", "--mode", "fwd,bwd,fwdbwd", "--repeats", "3",
                   "--warmup", "1", "--budget", "0.05", "--no-progress",
                   "--json", str(out_json), "--csv", str(out_csv)])
    assert rc == 0
    table = capsys.readouterr().out
    assert table.startswith("# package") and bench.OURS in table and "sdpa" in table
    doc = json.loads(out_json.read_text())
    assert bench.validate_json(doc) == []
    rows = doc["results"]
    assert len(rows) == 2 * 3 * len(doc["settings"]["contenders"])
    assert all(r["status"] == "ok" and r["rel_err"] < 1e-5 for r in rows)
    assert out_csv.read_text().startswith("# package_version:")


def test_bench_with_mask_bias_gqa_and_unequal_lengths(capsys):
    rc = cli.main(["bench", "--device", "cpu", "--i", "40", "--j", "24", "--d", "16", "--b", "2",
                   "--h", "4", "--hk", "2", "--mask-density", "0.6", "--bias", "--groups", "2",
                   "--causal", "yes", "--mode", "fwdbwd", "--repeats", "3", "--warmup", "1",
                   "--budget", "0.05", "--contenders", "cupy-cosine-attn,sdpa", "--quiet"])
    assert rc == 0


def test_unknown_contender_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--n", "16", "--contenders", "nope", "--quiet"])
    assert e.value.code == 2
    assert "unknown contender" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import fails
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--n", "16", "--plot", "x.png"])
    assert e.value.code == 2
    assert "matplotlib" in capsys.readouterr().err


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "kernel cache" in out and "cpu-tiled" in out and "torch" in out
    for dtype in ("float16", "bfloat16", "float32"):
        assert dtype in out


def test_kernel_path_defaults(monkeypatch):
    assert cli._default_kernel_path("float16") == "sm80-mma"
    assert cli._default_kernel_path("bfloat16") == "sm80-mma"
    assert cli._default_kernel_path("float32") == "sm80-fp32"
    assert cli.kernel_path("bfloat16", 128).startswith("sm80")


def test_warmup_without_gpu(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cuda_available", lambda: False)
    assert cli.main(["warmup"]) == 0
    assert "nothing to compile" in capsys.readouterr().out


def test_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "cupy_cosine_attn", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "bench" in res.stdout and "warmup" in res.stdout and "info" in res.stdout
