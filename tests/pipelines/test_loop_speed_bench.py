"""``deeptrends bench --all`` at a tiny budget: a family through its shipped config gives
positive rates, MFU against the peak of its precision, JSON, and the README table."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tensorflow")


@pytest.mark.slow
def test_family_bench_writes_json_and_the_table(tmp_path, tfds_dir):
    from pipelines.reports import bench

    out = tmp_path / "bench.json"
    report = bench.bench_all(
        ["lenet5"], ("float32",), seconds=0.2, peers=False, output_json=str(out), track=False
    )
    saved = json.loads(out.read_text())
    assert saved["families"] == report["families"] and not saved["errors"]
    (row,) = saved["families"]
    assert row["family"] == "lenet5" and row["precision"] == "float32"
    assert min(row["train_per_s"], row["infer_per_s"], row["input_per_s"]) > 0
    assert 0 < row["train_mfu"] and row["forward_gflops"] > 0
    assert saved["matmul_peak_gflops"]["float32"] > 0
    table = bench.markdown_table(saved)
    assert "| lenet5 (lenet5-digits) | float32 | 32 |" in table


def test_unknown_family_is_refused():
    from pipelines.reports import bench

    with pytest.raises(ValueError, match="--family 'lenet6'.*Accepted: lenet5"):
        bench.bench_all(["lenet6"], track=False)


def test_a_partial_bench_does_not_overwrite_the_whole_benchs_results():
    from pipelines.cli import _bench_output

    assert _bench_output(None, None) == "benchmarks/results/bench-families.json"
    assert _bench_output(["resnet50"], None) == "benchmarks/results/bench-resnet50.json"
    assert (
        _bench_output(None, ["mixed_bfloat16"])
        == "benchmarks/results/bench-families-mixed_bfloat16.json"
    )
