"""SavedModel export for TF Serving.

``write_saved_model`` writes a task's endpoints with ``keras.export.ExportArchive`` into
a temporary directory beside the target, adds TF Serving warm-up requests, reloads the
result from disk and compares every endpoint with the in-process model; ``publish``
renames it into ``<serving_dir>/<model_name>/<version>/`` (TF Serving ignores the
temporary name while it is being written, and never sees a half-written version).
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipelines.io import file_lock, write_text_atomic
from pipelines.tasks.base import Endpoint

log = logging.getLogger(__name__)

WARMUP_FILE = "assets.extra/tf_serving_warmup_requests"
# precision and agreement of the export (TF Serving ignores the file)
METADATA_FILE = "assets.extra/deeptrends_export.json"
# float16/bfloat16 models: the graph and eager paths round differently (fused kernels)
MIXED_PRECISION_ATOL = 1e-2


def tolerance(atol: float, precision_policy: str) -> float:
    """The export check's tolerance: ``atol`` in float32, relaxed under mixed precision
    (``auto`` as ``runtime.resolve_mixed_precision`` resolves it here)."""
    from pipelines.runtime import resolve_mixed_precision

    precision_policy = resolve_mixed_precision(precision_policy)
    return atol if precision_policy == "float32" else max(atol, MIXED_PRECISION_ATOL)


class ExportMismatch(RuntimeError):
    """The reloaded SavedModel does not reproduce the in-process model."""


@dataclass
class ExportResult:
    path: Path
    max_abs_diff: float
    signatures: list[str]


def _write_warmup(path: Path, model_name: str, endpoints: list[Endpoint], count: int) -> None:
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for ep in endpoints:
            if not ep.check_inputs:
                continue
            for _ in range(count):
                request = predict_pb2.PredictRequest(
                    model_spec=model_pb2.ModelSpec(name=model_name, signature_name=ep.name)
                )
                for spec, value in zip(ep.input_signature, ep.check_inputs, strict=False):
                    request.inputs[spec.name].CopyFrom(tf.make_tensor_proto(value[:1]))
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                writer.write(log.SerializeToString())


def _compare(name: str, expected: dict, got: dict, atol: float) -> float:
    worst = 0.0
    for key, want in expected.items():
        want = np.asarray(want)
        have = np.asarray(got[key])
        if want.shape != have.shape:
            raise ExportMismatch(
                f"{name}/{key}: shape {have.shape} after reload, {want.shape} in process"
            )
        if want.dtype.kind in "fc":
            diff = float(
                np.max(np.abs(want.astype(np.float64) - have.astype(np.float64)), initial=0.0)
            )
            worst = max(worst, diff)
            if diff > atol:
                raise ExportMismatch(f"{name}/{key}: max |saved - keras| = {diff:.3g} > {atol:g}")
        elif (
            want.dtype.kind in "iub"
            and not np.array_equal(want, have)
            and atol <= MIXED_PRECISION_ATOL / 10
        ):
            # At float32 tolerance class indices must agree exactly; under mixed precision
            # (relaxed atol) an argmax between near-tied probabilities may flip.
            raise ExportMismatch(f"{name}/{key}: integer outputs differ after reload")
        elif want.dtype.kind in "OSU" and not np.array_equal(
            want.astype(object), have.astype(object)
        ):
            raise ExportMismatch(f"{name}/{key}: string outputs differ after reload")
    return worst


def write_saved_model(
    model,
    endpoints: list[Endpoint],
    target: Path,
    *,
    model_name: str,
    warmup_requests: int = 4,
    atol: float = 1e-5,
    metadata: dict | None = None,
    traced: bool = False,
) -> ExportResult:
    """Write, reload and verify a SavedModel in a temporary directory beside ``target``.

    ``model`` is the network the endpoints run; ``metadata`` (JSON) is written to
    ``METADATA_FILE``. ``traced``: compare with the endpoints run as a ``tf.function``
    (a bfloat16 graph rounds where its kernels fuse, eagerly elsewhere, so only a traced
    run checks what saving kept, to float32 precision). Returns the result with ``path`` set to the temporary directory;
    call ``publish`` to move it into place. On any failure the temporary directory is
    removed.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:8]}"
    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        for ep in endpoints:
            archive.add_endpoint(ep.name, ep.fn, input_signature=ep.input_signature)
        archive.write_out(str(tmp), verbose=False)
        if warmup_requests:
            _write_warmup(tmp / WARMUP_FILE, model_name, endpoints, warmup_requests)
        if metadata:
            write_metadata(tmp, metadata)

        reloaded = tf.saved_model.load(str(tmp))
        worst = 0.0
        for ep in endpoints:
            if not ep.check_inputs:
                continue
            args = [tf.constant(v) for v in ep.check_inputs]
            expected = (tf.function(ep.fn) if traced else ep.fn)(*args)
            kwargs = {spec.name: a for spec, a in zip(ep.input_signature, args, strict=False)}
            got = reloaded.signatures[ep.name](**kwargs)
            worst = max(worst, _compare(ep.name, expected, got, atol))
        return ExportResult(tmp, worst, sorted(reloaded.signatures.keys()))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_metadata(path: Path, values: dict) -> None:
    """Merge ``values`` into the export's ``METADATA_FILE``."""
    file = path / METADATA_FILE
    current = json.loads(file.read_text()) if file.exists() else {}
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps({**current, **values}, indent=2) + "\n")


def publish(result: ExportResult, target: Path) -> Path:
    """Atomically move a verified export into ``target`` (which must not exist)."""
    if target.exists():
        shutil.rmtree(result.path, ignore_errors=True)
        raise FileExistsError(f"{target} already exists: refusing to overwrite a served version")
    result.path.rename(target)
    result.path = target
    return target


def next_version(serving_root: Path) -> int:
    """The next free version number under ``serving_root`` (exports without a registry)."""
    existing = [int(p.name) for p in serving_root.glob("[0-9]*") if p.name.isdigit()]
    return max(existing, default=0) + 1


def discard(result: ExportResult | None) -> None:
    if result is not None and result.path.name.startswith(".tmp-"):
        shutil.rmtree(result.path, ignore_errors=True)


def write_model_config(
    serving_dir: Path,
    model_name: str,
    served: list[int],
    labels: dict[str, int],
    labels_of: Callable[[str], dict[str, int]] | None = None,
) -> Path:
    """Refresh ``<serving_dir>/models.config`` (TF Serving's ``--model_config_file``) so
    that TF Serving serves the listed versions of ``model_name`` with version labels
    (``champion``, ``challenger``) instead of whatever version is highest.

    The state of every model is kept in ``models.json`` beside it and the text proto is
    rendered from it, under a lock (concurrent runs publish to one folder) with unique
    temporary files. Versions whose folders are gone are dropped. An unreadable
    ``models.json`` is rebuilt from the folders on disk and ``labels_of(name)`` (the
    registry's aliases) instead of failing the run."""
    with file_lock(serving_dir / ".models.lock"):
        state = _read_state(serving_dir, labels_of)
        state[model_name] = {"versions": sorted({int(v) for v in served}), "labels": labels}
        for name, entry in state.items():
            on_disk = {v for v in entry["versions"] if (serving_dir / name / str(v)).is_dir()}
            entry["versions"] = sorted(on_disk)
            entry["labels"] = {k: v for k, v in entry["labels"].items() if v in on_disk}
        path = serving_dir / "models.config"
        write_text_atomic(serving_dir / "models.json", json.dumps(state, indent=2))
        write_text_atomic(path, render_model_config(serving_dir, state))
    return path


def _read_state(serving_dir: Path, labels_of) -> dict:
    path = serving_dir / "models.json"
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        if isinstance(state, dict) and all(
            isinstance(e, dict)
            and isinstance(e.get("versions"), list)
            and isinstance(e.get("labels"), dict)
            for e in state.values()
        ):
            return state
    except (OSError, ValueError):
        pass
    log.warning("%s is unreadable: rebuilding it from the serving folders and the registry", path)
    state = {}
    for folder in sorted(
        p for p in serving_dir.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        versions = [int(v.name) for v in folder.iterdir() if v.is_dir() and v.name.isdigit()]
        if not versions:
            continue
        labels = dict(labels_of(folder.name)) if labels_of is not None else {}
        served = sorted(set(labels.values())) if labels else [max(versions)]
        state[folder.name] = {"versions": served, "labels": labels}
    return state


def render_model_config(serving_dir: Path, state: dict) -> str:
    """TF Serving's ``model_config_list`` text proto for ``state``."""
    blocks = []
    for name in sorted(state):
        entry = state[name]
        versions = "".join(f" versions: {v}" for v in entry["versions"])
        labels_text = "".join(
            f"\n    version_labels {{ key: '{k}' value: {v} }}"
            for k, v in sorted(entry["labels"].items())
        )
        blocks.append(
            "  config {\n"
            f"    name: '{name}'\n"
            f"    base_path: '{(serving_dir / name).resolve()}'\n"
            "    model_platform: 'tensorflow'\n"
            f"    model_version_policy {{ specific {{{versions} }} }}"
            f"{labels_text}\n"
            "  }"
        )
    return "model_config_list {\n" + "\n".join(blocks) + "\n}\n"
