"""``runtime.mixed_precision: auto`` resolves from the CPU's flags (faked here)."""

from __future__ import annotations

import os

import pytest

from pipelines import runtime
from pipelines.config import RuntimeConfig

INTEL_AMX = "flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AMD_ZEN4 = "flags\t\t: fpu vme sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
OLD_XEON = "flags\t\t: fpu vme sse2 avx2 avx512f avx512_vnni\n"
ARM = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"


@pytest.fixture
def cpuinfo(tmp_path):
    def write(flags: str) -> str:
        path = tmp_path / "cpuinfo"
        path.write_text("processor\t: 0\nmodel name\t: test\n" + flags + "\nprocessor\t: 1\n")
        return str(path)

    return write


@pytest.mark.parametrize(
    "flags, expected",
    [
        (INTEL_AMX, "mixed_bfloat16"),
        (AMD_ZEN4, "mixed_bfloat16"),
        (OLD_XEON, "float32"),
        (ARM, "float32"),
    ],
)
def test_auto_picks_bfloat16_only_where_the_cpu_has_it(cpuinfo, monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "_has_gpu", lambda: False)
    assert runtime.resolve_mixed_precision("auto", cpuinfo(flags)) == expected


def test_auto_is_float32_without_cpuinfo_and_with_a_gpu(cpuinfo, monkeypatch, tmp_path):
    monkeypatch.setattr(runtime, "_has_gpu", lambda: False)
    assert runtime.resolve_mixed_precision("auto", str(tmp_path / "absent")) == "float32"
    monkeypatch.setattr(runtime, "_has_gpu", lambda: True)
    assert runtime.resolve_mixed_precision("auto", cpuinfo(INTEL_AMX)) == "float32"


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_explicit_policies_are_kept(cpuinfo, policy):
    assert runtime.resolve_mixed_precision(policy, cpuinfo(OLD_XEON)) == policy


def test_float32_is_the_default_and_auto_is_opt_in():
    assert RuntimeConfig().mixed_precision == "float32"
    assert RuntimeConfig(mixed_precision="auto").mixed_precision == "auto"


def test_auto_is_logged_resolved_as_a_derived_param(monkeypatch):
    from pipelines import train

    monkeypatch.setattr(runtime, "resolve_mixed_precision", lambda policy: f"resolved-{policy}")

    class Strategy:
        num_replicas_in_sync = 1

    class Inputs:
        steps_per_epoch = 7

    from pipelines.config import load_config

    config = load_config("lenet5-digits", ["runtime.mixed_precision=auto"])
    params = train.run_params(config, config, Inputs(), Strategy())
    assert params["runtime.mixed_precision"] == "auto"
    assert params["derived.mixed_precision"] == "resolved-auto"


def test_onednn_is_preferred_on_x86_unless_the_environment_says(monkeypatch):
    import platform

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    runtime.prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"

    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")  # the user's choice stands
    runtime.prefer_onednn()
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"

    monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")  # TensorFlow's own default there
    runtime.prefer_onednn()
    assert "TF_ENABLE_ONEDNN_OPTS" not in os.environ


def test_the_run_logs_whether_onednn_runs(monkeypatch):
    from pipelines import train
    from pipelines.config import load_config

    class Strategy:
        num_replicas_in_sync = 1

    class Inputs:
        steps_per_epoch = 7

    config = load_config("lenet5-digits", [])
    params = train.run_params(config, config, Inputs(), Strategy())
    assert params["derived.onednn"] is runtime.onednn_enabled()
    if platform_is_x86() and os.environ.get("TF_ENABLE_ONEDNN_OPTS") == "1":
        assert params["derived.onednn"] is True  # the test session's TensorFlow runs it


def platform_is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")
