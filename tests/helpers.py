"""The shared model checks (keras-hub's ``TestCase``): build, one training step, ``.keras``
round trip, SavedModel parity, mixed precision, and the same network on the JAX backend.

Every registry-generated test in ``tests/models/`` calls these with a model built by
``build(name)``: its small arguments come from the registry metadata (the model's task
and family), never from its builder's signature, so registering a model tests it. A model
of a new task or family is tested at its builder's defaults until ``TASK_KWARGS`` or
``FAMILY_KWARGS`` gets an entry that makes it small.

Run as ``python -m tests.helpers jax OUT_DIR NAME...`` (with ``KERAS_BACKEND=jax``) this
module is the JAX side of ``check_jax_parity``: it builds each network, runs it forward,
trains it one step with ``fit`` and writes ``NAME.weights.h5`` and ``NAME.npz`` (inputs and
outputs after the step), or ``NAME.error`` (the traceback) into OUT_DIR.

Keras is imported inside the functions: the backend is chosen by the process that
imports it first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import models

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-5

# Small arguments by task, then by family (the family's win). Only sizes: what a network
# is made of stays the builder's default.
TASK_KWARGS: dict[str, dict[str, Any]] = {
    "classification": {"input_shape": (32, 32, 3), "num_classes": 5},
    "dbn_classification": {"input_shape": (8, 8, 1), "num_classes": 5},
    "generation": {"input_shape": (8, 8, 1)},
    "sequence": {"vocab_size": 25, "embedding_dim": 8, "units": 8},
    "translation": {
        "source_vocab_size": 30,
        "target_vocab_size": 20,
        "embedding_dim": 8,
        "units": 8,
        "attention_units": 8,
    },
    "detection": {"input_shape": (64, 64, 3), "num_classes": 3, "head_units": 8},
    "captioning": {
        "vocab_size": 20,
        "input_shape": (64, 64, 3),
        "backbone_kwargs": {"width_multiplier": 0.125},
        "embedding_dim": 8,
        "units": 8,
        "attention_units": 8,
    },
}
FAMILY_KWARGS: dict[str, dict[str, Any]] = {
    "vgg": {"width_multiplier": 0.125},
    "faster_rcnn": {"rpn_channels": 8},
    "draw": {"steps": 3, "latent_dim": 4, "encoder_units": 16, "decoder_units": 16},
}
# Networks too deep to build three times in the quick suite (marked slow).
HEAVY = frozenset({"resnet101", "resnet152"})

BATCH = 4
SOURCE_LENGTH, TARGET_LENGTH, SEQUENCE_LENGTH, IMAGE_SIZE = 7, 5, 6, 64


def registered() -> list[str]:
    """Every registered model, tests' own registrations left out."""
    return [name for name in models.list_models() if not name.startswith("tests-")]


def small_kwargs(name: str) -> dict[str, Any]:
    """The builder arguments of the quick checks, from the model's task and family."""
    info = models.model_info(name)
    return {**TASK_KWARGS.get(info.task, {}), **FAMILY_KWARGS.get(info.family, {})}


def build(name: str, **overrides):
    """The registered network ``name`` at its small size, seeded."""
    import keras

    keras.utils.set_random_seed(0)
    return models.create_model(name, **{**small_kwargs(name), **overrides})


def example_inputs(name: str, model, batch: int = BATCH, seed: int = 0) -> list[np.ndarray]:
    """A batch for ``model``, as a list with one array per input: floats (images, latents,
    noise, boxes) uniform in [0, 1), token ids in [1, 5) (0 is padding); a free image side
    is ``IMAGE_SIZE``, a free length ``SEQUENCE_LENGTH``."""
    rng = np.random.default_rng(seed)
    info = models.model_info(name)
    if info.task == "translation":  # a subclassed model: [source ids, shifted target ids]
        kwargs = small_kwargs(name)
        source = rng.integers(1, kwargs["source_vocab_size"], (batch, SOURCE_LENGTH))
        source[0, SOURCE_LENGTH - 2 :] = 0  # one padded sentence
        target = rng.integers(1, kwargs["target_vocab_size"], (batch, TARGET_LENGTH))
        return [source.astype("int32"), target.astype("int32")]
    arrays = []
    for spec in model.inputs:
        free = IMAGE_SIZE if len(spec.shape) == 4 else SEQUENCE_LENGTH  # a None dimension
        shape = [batch] + [free if d is None else d for d in spec.shape[1:]]
        if "int" in str(spec.dtype):
            arrays.append(rng.integers(1, 5, shape).astype(str(spec.dtype)))
        else:
            arrays.append(rng.uniform(size=shape).astype("float32"))
    return arrays


def as_model_input(inputs: list[np.ndarray]):
    """What ``model(...)`` takes: the array itself for a one-input model."""
    return inputs[0] if len(inputs) == 1 else list(inputs)


def forward(model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """The outputs of ``model`` in inference mode, flattened to a list of arrays."""
    import keras

    outputs = model(as_model_input(inputs), training=False)
    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def assert_close(got: list[np.ndarray], expected: list[np.ndarray], atol=ATOL, what=""):
    assert len(got) == len(expected), f"{what}: {len(got)} outputs, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        np.testing.assert_allclose(
            np.asarray(g, "float32"),
            np.asarray(e, "float32"),
            atol=atol,
            rtol=atol,
            err_msg=f"{what}: output {i}",
        )


# ----------------------------------------------------------------------- the checks


def check_build(name: str, model) -> None:
    """The network builds, runs forward and gives finite outputs."""
    outputs = forward(model, example_inputs(name, model))
    assert outputs, name
    for i, out in enumerate(outputs):
        assert out.shape[0] == BATCH, (name, i, out.shape)
        assert np.isfinite(out).all(), f"{name}: output {i} is not finite"


def predict(model, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """``forward`` through ``model.predict``: one compiled function (on JAX, an eager call
    would compile every operation on its own)."""
    import keras

    outputs = model.predict(as_model_input(inputs), batch_size=BATCH, verbose=0)
    return [np.asarray(o) for o in keras.tree.flatten(outputs)]


def train_step(
    name: str,
    model,
    inputs: list[np.ndarray] | None = None,
    outputs: list[np.ndarray] | None = None,
) -> float:
    """One ``fit`` step of a mean-squared error on every output (targets: uniform noise of
    the outputs' shapes). A supervised step even for networks whose own algorithm is not
    (RBM, GAN, VAE, DRAW: the trainers in pipelines/ test those): this checks that
    gradients reach the weights. ``outputs``: the model's outputs on ``inputs`` if known
    (their shapes are the targets'). Returns the loss."""
    import keras

    inputs = example_inputs(name, model) if inputs is None else inputs
    outputs = forward(model, inputs) if outputs is None else outputs
    rng = np.random.default_rng(1)
    targets = [rng.uniform(size=o.shape).astype("float32") for o in outputs]
    try:
        structure = model.output
    except AttributeError:  # a subclassed model (seq2seq): a tensor or a list
        structure = None
    if isinstance(structure, dict):  # a dict of outputs, flattened in sorted key order
        targets = dict(zip(sorted(structure), targets, strict=True))
        loss = {k: "mse" for k in targets}
    else:
        targets = targets[0] if len(targets) == 1 else targets
        loss = ["mse"] * len(outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=loss)
    history = model.fit(
        as_model_input(inputs),
        targets,
        batch_size=BATCH,
        epochs=1,
        verbose=0,
        shuffle=False,
    )
    return float(history.history["loss"][-1])


def check_train_step(name: str, model) -> None:
    """One training step gives a finite loss and moves the trainable weights."""
    before = [np.array(w) for w in model.trainable_weights]
    loss = train_step(name, model)
    assert np.isfinite(loss), f"{name}: loss {loss}"
    after = [np.array(w) for w in model.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)), (
        f"{name}: no trainable weight changed in one step"
    )


def check_keras_round_trip(name: str, model, tmp_path: Path) -> None:
    """Saved as ``.keras`` and loaded back (custom objects by their registered names), the
    network gives the same outputs and has the same weights."""
    import keras

    inputs = example_inputs(name, model)
    path = Path(tmp_path) / f"{name}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    assert len(reloaded.weights) == len(model.weights), name
    assert_close(forward(reloaded, inputs), forward(model, inputs), atol=1e-6, what=name)


def check_saved_model(name: str, model, tmp_path: Path) -> None:
    """A SavedModel written by ``keras.export.ExportArchive`` (one ``serve`` endpoint with
    a free batch dimension) and reloaded with ``tf.saved_model.load`` gives the outputs of
    the Keras model within 1e-5."""
    import keras
    import tensorflow as tf

    inputs = example_inputs(name, model)
    signature = [
        tf.TensorSpec((None, *x.shape[1:]), x.dtype, name=f"input_{i}")
        for i, x in enumerate(inputs)
    ]

    def serve(*args):
        return model(as_model_input(list(args)), training=False)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve, input_signature=signature)
    path = Path(tmp_path) / f"{name}_saved_model"
    archive.write_out(str(path), verbose=False)
    reloaded = tf.saved_model.load(str(path))
    served = reloaded.serve(*[tf.constant(x) for x in inputs])
    got = [np.asarray(t) for t in tf.nest.flatten(served)]
    assert_close(got, forward(model, inputs), what=f"{name} SavedModel")


def check_mixed_precision(name: str, policy: str = "mixed_bfloat16") -> None:
    """Built under ``policy`` the network runs, its outputs are finite and float32 (every
    registered network promises float32 outputs: heads, logits and likelihood
    parameters are computed in float32 whatever the policy)."""
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        model = build(name)
        inputs = example_inputs(name, model)
        outputs = model(as_model_input(inputs), training=False)
        for i, out in enumerate(keras.tree.flatten(outputs)):
            dtype = keras.backend.standardize_dtype(out.dtype)
            assert dtype == "float32", f"{name}: output {i} is {dtype} under {policy}"
            assert np.isfinite(keras.ops.convert_to_numpy(out)).all(), (name, i)
    finally:
        keras.config.set_dtype_policy(previous)


# ----------------------------------------------------------------------- JAX parity


@dataclass(frozen=True)
class JaxRun:
    """What the JAX subprocess left for one network."""

    weights: Path
    inputs: list[np.ndarray]
    outputs: list[np.ndarray]


def jax_cache_dir() -> Path:
    """Where the JAX subprocess keeps XLA's compiled programs between test sessions
    (``$DEEPTRENDS_JAX_CACHE``, else a folder in the system's temporary directory)."""
    default = Path(tempfile.gettempdir()) / "deeptrends-jax-cache"
    return Path(os.environ.get("DEEPTRENDS_JAX_CACHE", default))


def start_jax(names: list[str], out_dir: Path) -> subprocess.Popen:
    """Start the JAX side for ``names`` in one subprocess (it runs while the caller goes
    on with the TensorFlow checks); ``collect_jax`` waits for it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # Small networks run in milliseconds; XLA's compile time is what costs here.
    env.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
    return subprocess.Popen(
        [sys.executable, "-m", "tests.helpers", "jax", str(out_dir), *names],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def collect_jax(
    proc: subprocess.Popen, names: list[str], out_dir: Path, timeout: float = 1800
) -> dict[str, Any]:
    """Wait for ``start_jax``'s subprocess; return name -> ``JaxRun``, or the error text of
    that network (or of the whole subprocess)."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
        log = f"timed out after {timeout} s\n{log}"
    out_dir = Path(out_dir)
    (out_dir / "jax.log").write_text(log)  # seconds per network, warnings
    results: dict[str, Any] = {}
    for name in names:
        error, data = out_dir / f"{name}.error", out_dir / f"{name}.npz"
        if error.exists():
            results[name] = error.read_text()
        elif data.exists():
            with np.load(data) as arrays:
                inputs = [arrays[f"input_{i}"] for i in range(int(arrays["num_inputs"]))]
                outputs = [arrays[k] for k in sorted(arrays.files) if k.startswith("output_")]
            results[name] = JaxRun(out_dir / f"{name}.weights.h5", inputs, outputs)
        else:
            results[name] = (
                f"the JAX subprocess (rc {proc.returncode}) left nothing:\n{log[-5000:]}"
            )
    return results


def check_jax_parity(name: str, model, run: Any) -> None:
    """Weights trained one step on JAX load into the TensorFlow-built ``model`` and give
    the JAX outputs on the same inputs within 1e-4 (absolute and relative): XLA and oneDNN
    sum float32 in different orders, and which order oneDNN picks depends on the threads
    the process has (AlexNet's 4096-wide layers and LRN reached 5.9e-5 in a full suite
    run, within 1e-5 alone); a wrong layer differs by orders of magnitude more."""
    assert isinstance(run, JaxRun), f"{name} on JAX:\n{run}"
    model.load_weights(run.weights)
    assert_close(
        forward(model, run.inputs), run.outputs, atol=1e-4, what=f"{name} JAX -> TensorFlow"
    )


def _jax_main(out_dir: str, names: list[str]) -> int:
    import jax

    jax.config.update("jax_compilation_cache_dir", str(jax_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    import keras

    if keras.backend.backend() != "jax":
        print(f"KERAS_BACKEND is {keras.backend.backend()!r}, not 'jax'", file=sys.stderr)
        return 2
    out = Path(out_dir)
    for name in names:
        start = time.perf_counter()
        try:
            model = build(name)
            inputs = example_inputs(name, model)
            before = predict(model, inputs)  # the forward pass
            if not all(np.isfinite(y).all() for y in before):
                raise AssertionError("the forward pass on JAX is not finite")
            loss = train_step(name, model, inputs, before)
            if not np.isfinite(loss):
                raise AssertionError(f"loss {loss} after one fit step on JAX")
            outputs = predict(model, inputs)
            model.save_weights(out / f"{name}.weights.h5")
            arrays = {f"input_{i}": x for i, x in enumerate(inputs)}
            arrays.update({f"output_{i:03d}": y for i, y in enumerate(outputs)})
            np.savez(out / f"{name}.npz", num_inputs=len(inputs), **arrays)
        except Exception:  # noqa: BLE001 - reported per network to the parent test
            (out / f"{name}.error").write_text(traceback.format_exc())
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
        keras.backend.clear_session()
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "jax":
        sys.exit("usage: python -m tests.helpers jax OUT_DIR NAME...")
    sys.exit(_jax_main(sys.argv[2], sys.argv[3:]))
