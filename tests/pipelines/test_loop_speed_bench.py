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


def test_the_host_and_graph_costs_split_from_two_execution_sizes():
    from pipelines.reports.profile import split_costs

    # t_N = S + H / N with S = 3 ms, H = 0.9 ms
    host, graph = split_costs(3.9, 3.09, 10)
    assert host == pytest.approx(0.9) and graph == pytest.approx(3.0)
    assert split_costs(3.0, 3.2, 10) == (0.0, 3.0)  # noise: the larger execution was slower
    with pytest.raises(ValueError, match="n must be > 1"):
        split_costs(3.0, 3.0, 1)


def test_op_types_are_summed_in_classes():
    from pipelines.reports.profile import op_class

    assert op_class("Conv2DBackpropFilter") == op_class("_MklNativeFusedConv2D") == "convolution"
    assert op_class("_MklMatMul") == op_class("BatchMatMulV2") == "matmul"
    assert op_class("MaxPoolGrad") == "pooling"
    assert op_class("AssignSubVariableOp") == op_class("ResourceApplyAdam") == "optimizer"
    assert op_class("Tanh") == "other"


@pytest.mark.slow
def test_step_profile_of_a_family_times_splits_and_traces(tfds_dir):
    from pipelines.reports.profile import format_profile, profile_family

    p = profile_family("lenet5", steps_per_execution=(5,), steps=10, rounds=1)
    assert p.steps_per_execution == [1, 5] and min(p.ms_per_step.values()) > 0
    assert p.host_ms_per_call >= 0 and p.graph_ms_per_step > 0
    assert p.ceiling >= 1.0
    trace = p.trace
    assert trace["steps"] == 10 and trace["calls"] == 10  # traced at one step per execution
    # LeNet-5's step is its convolutions: their forward and backward kernels are in the trace
    assert trace["by_class"]["convolution"] > 0
    assert any("Conv2DBackpropFilter" in op for op in trace["op_us"])
    assert not {"While", "PartitionedCall", "StatefulPartitionedCall"} & set(trace["op_us"])
    text = format_profile(p)
    assert "host per call H" in text and "convolution" in text
    with pytest.raises(ValueError, match="steps_per_execution must be >= 1"):
        profile_family("lenet5", steps_per_execution=(0,))


@pytest.mark.slow
def test_lrn_bench_alternates_composite_and_kernel(tmp_path, mnist_dir, tfds_dir):
    import importlib.util
    from pathlib import Path

    import models.layers

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_lrn.py"
    spec = importlib.util.spec_from_file_location("bench_lrn", script)
    bench_lrn = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_lrn)
    out = tmp_path / "lrn.json"
    argv = ["--family", "alexnet", "--rounds", "1", "--seconds", "0.1", "--output", str(out)]
    assert bench_lrn.main(argv) == 0
    entry = json.loads(out.read_text())["families"]["alexnet"]
    assert entry["config"] == "alexnet-mnist"
    for key in ("train_per_s", "infer_per_s"):
        assert min(entry[key]["composite"], entry[key]["kernel"]) > 0
        assert entry[key]["kernel_over_composite"] > 0
    assert ("lrn", "tensorflow") in models.layers._KERNELS  # the kernel is back for what runs next
