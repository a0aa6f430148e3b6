"""A tiny run of ``benchmarks/attention.py``: the record schema, the ratios, the memory tracker, the baseline."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from tiny_vision_models import LAYOUT_MATCHES

ROOT = Path(__file__).resolve().parent.parent


def load_script(module_name: str, file_name: str):
    """A script of ``benchmarks/`` imported as a module (the folder is no package)."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / "benchmarks" / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_script("hf_posenc_benchmark", "attention.py")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--tiny", "--lengths", "24", "--reps", "1", "--decode-contexts", "8", "16", "--decode-steps", "1",
            "--clock", "cpu", "--lora-length", "16",
            "--vision-grids", *(["3"] if LAYOUT_MATCHES else []),  # image rows: see test_rope_2d
            "--json", str(out / "r.json"), "--markdown", str(out / "r.md")]
    bench.main(argv)
    return json.loads((out / "r.json").read_text()), (out / "r.md").read_text()


def test_records_follow_the_issue_schema(bench, run):
    records, _ = run
    types = {"encoding": str, "T": int, "mode": str, "time_s": float, "peak_mem_bytes": int,
             "time_ratio_vs_sdpa": float, "peak_mem_ratio_vs_eager": float}
    for r in records:
        for key, kind in types.items():
            assert isinstance(r[key], kind), (key, r)
        assert r["mode"] in ("forward", "forward_backward", "decode", "lora_train")
        assert r["time_s"] > 0 and r["peak_mem_bytes"] > 0
    groups = {}
    for r in records:
        groups.setdefault((r["scope"], r["mode"], r["T"]), []).append(r)
    # Every mode, both decode contexts, and every encoding in each group.
    image = {("vit_model", "forward"), ("vit_model", "forward_backward"), ("vit_attention", "forward"),
             ("vit_attention", "forward_backward")} if LAYOUT_MATCHES else set()
    assert {(s, m) for s, m, _ in groups} == {("model", "forward"), ("model", "forward_backward"), ("model", "decode"),
                                              ("model", "lora_train"), ("attention", "forward"),
                                              ("attention", "forward_backward"), *image}
    assert {t for s, m, t in groups if s.startswith("vit_")} == ({3 * 3 + 1} if LAYOUT_MATCHES else set())
    assert {t for s, m, t in groups if m == "decode"} == {8, 16}
    for (scope, _mode, _length), rows in groups.items():
        expected = bench.VISION_ENCODINGS if scope in bench.VISION_SCOPES else bench.ENCODINGS
        assert sorted(r["encoding"] for r in rows) == sorted(expected)
        by = {r["encoding"]: r for r in rows}
        assert by["stock_sdpa"]["time_ratio_vs_sdpa"] == 1.0 and by["stock_eager"]["peak_mem_ratio_vs_eager"] == 1.0
        for r in rows:  # the ratios are the medians divided by the same group's stock numbers
            assert r["time_ratio_vs_sdpa"] == pytest.approx(r["time_s"] / by["stock_sdpa"]["time_s"], rel=1e-3)
            assert r["peak_mem_ratio_vs_eager"] == pytest.approx(
                r["peak_mem_bytes"] / by["stock_eager"]["peak_mem_bytes"], rel=1e-3)


def test_markdown_has_a_row_per_encoding(bench, run):
    _, table = run
    for name in (*bench.ENCODINGS, *(bench.VISION_ENCODINGS if LAYOUT_MATCHES else ())):
        assert f"| {name} |" in table
    if LAYOUT_MATCHES:
        assert "**vit_model, forward**" in table and "**vit_attention, forward+backward**" in table
    assert "**model, forward+backward**" in table and "**model, decode" in table


def test_peak_memory_tracker_counts_live_bytes(bench):
    def step():
        a = torch.empty(1 << 20, dtype=torch.uint8)
        b = torch.empty(3 << 20, dtype=torch.uint8)
        view = b[10:]  # a view adds no bytes
        del a
        c = torch.empty(1 << 20, dtype=torch.uint8)  # fits where a was: the peak stays 4 MiB
        del b, c, view

    assert bench.peak_memory(step) == 4 << 20


def test_naive_baseline_computes_the_same_attention(bench):
    """The benchmark's full-tensor baseline and the library's fast path must agree, or the comparison is void."""
    torch.manual_seed(0)
    fast = bench.CoPE(8, npos_max=5, block_size=3)
    naive = bench.NaiveCoPE(8, npos_max=5)
    with torch.no_grad():
        fast.pos_emb.normal_()
        naive.pos_emb.copy_(fast.pos_emb)
    q, k, v = (torch.randn(2, 2, 11, 8) for _ in range(3))
    with torch.no_grad():
        expected, _ = naive.attend(q, k, v, None, 8 ** -0.5, diagonal=0)
        got, _ = fast.attend(q, k, v, None, 8 ** -0.5, diagonal=0)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fold_error_is_measured_against_fp64(bench):
    records = bench.fold_error([96], heads=2, dim=8)
    assert {r["path"] for r in records} == {"sdpa", "eager"}
    for r in records:
        assert 0 < r["max_row_rel_error"] < 1e-5 and r["time_s"] > 0


# ---------------------------------------------------------------------------------------------------
# benchmarks/memory.py: peak memory against T (issue 25)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def memory_bench():
    return load_script("hf_posenc_memory_benchmark", "memory.py")


def test_memory_smoke_covers_every_token_kind_and_both_modes(memory_bench, tmp_path):
    from hf_posenc import registry

    records = memory_bench.main(["--smoke", "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md"),
                                 "--plot", str(tmp_path / "m.png")])
    token_kinds = {k for k in registry.kinds() if not registry.get(k).capabilities.patch_grid}
    assert {r["encoding"] for r in records} == {"stock_sdpa", *token_kinds, *memory_bench.VARIANTS}
    assert {(r["T"], r["mode"]) for r in records} == {(16, "forward"), (16, "forward_backward")}
    for r in records:
        assert r["peak_bytes"] >= 0 and r["method"] == "rss_high_water"
        if r["encoding"] == "stock_sdpa" and "ratio_vs_sdpa" in r:
            assert r["ratio_vs_sdpa"] == 1.0
    assert json.loads((tmp_path / "m.json").read_text()) == records
    table = (tmp_path / "m.md").read_text()
    assert "**forward+backward**" in table and "| kerple |" in table
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_plot_draws_a_mode_whose_steps_added_no_memory(memory_bench, tmp_path):
    # A smoke-sized forward step can add no resident memory at all (seen on CI): then no ratio exists for that
    # mode, and its panels must still draw instead of asking matplotlib for a log axis over no data.
    records = [
        {"encoding": encoding, "T": 16, "mode": "forward", "peak_bytes": 0} for encoding in ("stock_sdpa", "kerple")
    ] + [
        {"encoding": "stock_sdpa", "T": 16, "mode": "forward_backward", "peak_bytes": 2**20, "ratio_vs_sdpa": 1.0},
        {"encoding": "kerple", "T": 16, "mode": "forward_backward", "peak_bytes": 2**19, "ratio_vs_sdpa": 0.5},
    ]
    memory_bench.plot(records, str(tmp_path / "zero.png"))
    assert (tmp_path / "zero.png").read_bytes()[:4] == b"\x89PNG"


def test_memory_row_runs_in_a_fresh_process_and_ratios_divide_by_sdpa(memory_bench):
    args = memory_bench.parse_args(["--tiny", "--threads", "1", "--lengths", "16", "--modes", "forward_backward"])
    (cell,) = memory_bench.run_encoding_in_subprocess("kerple", args)
    assert cell["encoding"] == "kerple" and cell["peak_bytes"] >= 0 and cell["method"] == "rss_high_water"
    records = [{"encoding": "stock_sdpa", "T": 8, "mode": "forward", "peak_bytes": 4},
               {"encoding": "kerple", "T": 8, "mode": "forward", "peak_bytes": 6},
               {"encoding": "kerple", "T": 16, "mode": "forward", "skipped": "predicted"}]
    memory_bench.add_ratios(records)
    assert records[0]["ratio_vs_sdpa"] == 1.0 and records[1]["ratio_vs_sdpa"] == 1.5
    assert "ratio_vs_sdpa" not in records[2]
    # A cell predicted (quadratically) past the memory available is skipped with the reason.
    huge = [{"encoding": "kerple", "T": 8, "mode": "forward", "peak_bytes": 1 << 40}]
    assert "predicted" in memory_bench.fits(huge, "kerple", 16, "forward")
    assert memory_bench.fits(huge, "nope", 16, "forward") is None


# ---------------------------------------------------------------------------------------------------
# benchmarks/gpu.py: the tiny CPU run (its GPU run is documented in benchmarks/README.md)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("hf_posenc_gpu_benchmark", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_smoke_covers_every_encoding_and_mode(gpu_bench, tmp_path):
    records = gpu_bench.main(["--smoke", "--lengths", "16", "--reps", "1", "--decode-steps", "1",
                              "--json", str(tmp_path / "g.json"), "--markdown", str(tmp_path / "g.md")])
    assert json.loads((tmp_path / "g.json").read_text()) == records
    assert {(r["encoding"], r["mode"]) for r in records} == {
        (e, m) for e in gpu_bench.encodings(smoke=True) for m in gpu_bench.MODES}
    for r in records:
        assert r["error"] is None, r
        assert r["time_s"] > 0 and r["peak_mem_bytes"] > 0
        if r["encoding"] == "stock_sdpa":
            assert r["time_ratio_vs_sdpa"] == 1.0
        assert r["time_ratio_vs_flash"] is None  # no flash attention on CPU
    assert "### forward_backward" in (tmp_path / "g.md").read_text()
