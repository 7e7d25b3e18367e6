"""Where a training step's time goes: the loop's own step function of a family's shipped
config, timed at one and at ``N`` steps per execution and traced by the TensorFlow
profiler (``benchmarks/profile_step.py``).

Two views of one step, from one process:

* **Timing** (no profiler running; the executions alternate, round after round, and the
  medians are kept). A call of ``N`` steps costs ``N * S + H``: ``S`` the step's work in
  the graph, ``H`` what one call costs on the host (the Python call, the function's
  dispatch, the wait for its result). From the per-step times at 1 and ``N`` steps per call,
  ``H = (t_1 - t_N) * N / (N - 1)`` and ``S = t_1 - H``; ``(S + H) / S`` is the most that
  any number of steps per execution can gain on this machine: the rest is the graph's.
* **Trace** (``tf.profiler.experimental``, one execution size). The XPlane's op events
  (``node:OpType`` on the executor's threads) summed by op type, per step; the executor's
  own time (``ExecutorState::Process`` minus the ops inside it); the wall time of a call.
"""

from __future__ import annotations

import collections
import glob
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass

# Ops that only run other ops (their events span the ops of their body).
_CONTAINERS = frozenset(
    {"While", "StatelessWhile", "If", "StatelessIf", "PartitionedCall", "StatefulPartitionedCall"}
)
# The classes of op type the summary groups by (in this order; anything else is "other").
_CLASSES = (
    ("convolution", ("Conv2D", "DepthwiseConv2d", "Conv3D")),
    ("matmul", ("MatMul", "Einsum")),
    ("pooling", ("Pool",)),
    ("optimizer", ("VariableOp", "ResourceApply", "Assign")),
    ("input", ("IteratorGetNext",)),
)


def op_class(op_type: str) -> str:
    """The class an op type is summed under (``convolution``, ``matmul``, ``pooling``,
    ``optimizer``, ``input`` or ``other``)."""
    for name, marks in _CLASSES:
        if any(mark in op_type for mark in marks):
            return name
    return "other"


@dataclass
class Trace:
    """One trace of ``steps`` training steps, in microseconds per step."""

    steps: int
    op_us: dict[str, float]  # op type -> kernel time per step (summed over threads)
    executor_us: float  # the executor's own time per step, outside the ops
    call_us: float  # wall time of one Python call of the step function (under the profiler)
    calls: int

    @property
    def kernel_us(self) -> float:
        return sum(self.op_us.values())

    def by_class(self) -> dict[str, float]:
        out: dict[str, float] = collections.Counter()
        for op, us in self.op_us.items():
            out[op_class(op)] += us
        return dict(out)


def read_xspace(path: str, steps: int, calls: int, function_names: tuple[str, ...]) -> Trace:
    """Sum the op events of one ``.xplane.pb`` by op type, per step.

    ``function_names`` are the Python-side events of the step function's calls (the
    ``tf.function``'s name: the loop's are ``one`` and ``many``)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(path, "rb") as f:
        space.ParseFromString(f.read())
    ops: dict[str, float] = collections.Counter()
    process_ps = 0.0
    inside_ps = 0.0
    call_ps = 0.0
    for plane in space.planes:
        names = plane.event_metadata
        for line in plane.lines:
            compute = line.name.startswith("tf_Compute") or line.name.startswith("tf_inter")
            for event in line.events:
                name = names[event.metadata_id].name
                if line.name == "python":
                    if name in function_names:
                        call_ps += event.duration_ps
                    continue
                if not compute:
                    continue
                if name == "ExecutorState::Process":
                    process_ps += event.duration_ps
                elif ":" in name:
                    op_type = name.rsplit(":", 1)[1]
                    if op_type in _CONTAINERS:
                        continue
                    ops[op_type] += event.duration_ps
                    inside_ps += event.duration_ps
    per_step = 1e6 * steps  # ps -> us, per step
    return Trace(
        steps=steps,
        op_us={k: v / per_step for k, v in sorted(ops.items(), key=lambda kv: -kv[1])},
        executor_us=max(0.0, process_ps - inside_ps) / per_step,
        call_us=call_ps / 1e6 / max(1, calls),
        calls=calls,
    )


@dataclass
class StepProfile:
    family: str
    config: str
    precision: str
    batch_size: int
    steps_per_execution: list[int]
    ms_per_step: dict[str, float]  # "N" -> median ms per step
    rounds_ms_per_step: dict[str, list[float]]
    host_ms_per_call: float | None  # H
    graph_ms_per_step: float | None  # S
    ceiling: float | None = None  # (S + H) / S: the most any N can gain here
    trace: dict | None = None
    trace_steps_per_execution: int = 1


def split_costs(t1: float, tn: float, n: int) -> tuple[float, float]:
    """``(H, S)``: the host's cost per call and the graph's per step, from the per-step
    times at 1 and at ``n`` steps per call (``t = S + H / n``). ``H`` is floored at 0:
    when the larger executions are not faster the host costs nothing measurable."""
    if n <= 1:
        raise ValueError(f"n must be > 1 to split the costs. Received: {n}")
    host = max(0.0, (t1 - tn) * n / (n - 1))
    return host, t1 - host


def profile_family(
    family: str,
    precision: str = "float32",
    steps_per_execution: tuple[int, ...] = (1, 10),
    steps: int = 100,
    rounds: int = 5,
    trace_steps_per_execution: int | None = None,
    overrides=(),
) -> StepProfile:
    """Time the family's training step at each execution size (``steps`` steps, alternating,
    ``rounds`` times) and trace ``steps`` steps at ``trace_steps_per_execution`` (the
    first size by default)."""
    import keras
    import tensorflow as tf

    from pipelines import loop
    from pipelines.reports.bench import FAMILIES, build_family

    if any(int(n) < 1 for n in steps_per_execution):
        raise ValueError(f"steps_per_execution must be >= 1. Received: {steps_per_execution}")
    sizes = sorted({1, *(int(n) for n in steps_per_execution)})  # 1 is the reference
    if steps < max(sizes):
        raise ValueError(f"steps ({steps}) must be at least the largest execution ({max(sizes)})")
    config, strategy, inputs, model = build_family(family, precision, overrides)
    iterator = iter(strategy.experimental_distribute_dataset(inputs.train.repeat()))
    loop.build_state(model, strategy, next(iter(inputs.train.take(1))))
    train_fn, _ = loop._step_functions(model, strategy, config.runtime.jit_compile)

    def run(n: int, total: int) -> float:
        t0 = time.perf_counter()
        logs = None
        for _ in range(total // n):
            logs = train_fn(iterator, n)
        tf.nest.map_structure(lambda t: t.numpy(), logs)  # wait for the last execution
        return (time.perf_counter() - t0) / (total // n * n)

    for n in sizes:  # trace and warm up every size
        run(n, max(n, 2 * n))
    rounds_ms: dict[str, list[float]] = {str(n): [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            rounds_ms[str(n)].append(run(n, steps) * 1e3)
    med = {k: statistics.median(v) for k, v in rounds_ms.items()}
    host = graph = None
    ceiling = None
    if len(sizes) > 1:
        n = sizes[-1]
        host, graph = split_costs(med["1"], med[str(n)], n)
        ceiling = (graph + host) / graph if graph > 0 else 1.0

    traced = trace_steps_per_execution or sizes[0]
    directory = tempfile.mkdtemp(prefix="deeptrends-profile-")
    try:
        calls = steps // traced
        tf.profiler.experimental.start(directory)
        try:
            run(traced, calls * traced)
        finally:
            tf.profiler.experimental.stop()
        files = glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True)
        trace = read_xspace(files[0], calls * traced, calls, ("one", "many")) if files else None
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    keras.mixed_precision.set_global_policy("float32")
    return StepProfile(
        family=family,
        config=FAMILIES[family][0],
        precision=precision,
        batch_size=int(config.train.batch_size),
        steps_per_execution=sizes,
        ms_per_step=med,
        rounds_ms_per_step=rounds_ms,
        host_ms_per_call=host,
        graph_ms_per_step=graph,
        ceiling=ceiling,
        trace=(
            {**asdict(trace), "kernel_us": trace.kernel_us, "by_class": trace.by_class()}
            if trace
            else None
        ),
        trace_steps_per_execution=traced,
    )


def format_profile(p: StepProfile, top: int = 10) -> str:
    """The profile as text: the timings, the split, the ceilings and the trace's ops."""
    lines = [f"{p.family} ({p.config}), {p.precision}, batch {p.batch_size}:"]
    for n in p.steps_per_execution:
        ms = p.ms_per_step[str(n)]
        lines.append(f"  {n:>3d} step(s) per execution: {ms:8.3f} ms/step (median)")
    if p.host_ms_per_call is not None:
        last = p.steps_per_execution[-1]
        gain = p.ms_per_step["1"] / p.ms_per_step[str(last)]
        lines.append(
            f"  host per call H = {p.host_ms_per_call:.3f} ms, graph per step S = "
            f"{p.graph_ms_per_step:.3f} ms; N = {last} gains {gain:.2f}x, any N at most "
            f"{p.ceiling:.2f}x (S + H) / S"
        )
    if p.trace:
        t = p.trace
        kernel = t["kernel_us"]
        lines.append(
            f"  trace at {p.trace_steps_per_execution} step(s) per execution, per step: "
            f"ops {kernel / 1e3:.3f} ms (summed over threads), executor "
            f"{t['executor_us'] / 1e3:.3f} ms; a call {t['call_us'] / 1e3:.3f} ms (wall)"
        )
        for name, us in sorted(t["by_class"].items(), key=lambda kv: -kv[1]):
            lines.append(f"    {name:12s} {us / 1e3:8.3f} ms  {100 * us / kernel:5.1f}%")
        lines.append("  top op types:")
        for op, us in list(t["op_us"].items())[:top]:
            lines.append(f"    {op:32s} {us / 1e3:8.3f} ms  {100 * us / kernel:5.1f}%")
    return "\n".join(lines)
