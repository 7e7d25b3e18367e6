"""The CLI: listing commands are instant (no TensorFlow, no MLflow import)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

PROBE = (
    "import sys; from pipelines.cli import main; rc = main({argv!r}); "
    "heavy = [m for m in ('tensorflow', 'mlflow', 'keras') if m in sys.modules]; "
    "assert not heavy, heavy; sys.exit(rc)"
)


@pytest.mark.parametrize("argv", [["configs"], ["models"], ["datasets"]])
def test_listing_commands_import_no_tensorflow(argv):
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    assert elapsed < 3.0, f"{argv} took {elapsed:.2f}s"


def test_help_imports_no_tensorflow():
    code = (
        "import sys\nfrom pipelines.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'tensorflow' not in sys.modules and 'mlflow' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout and "export" in out.stdout


def test_listings_show_registered_names(capsys):
    from pipelines.cli import main

    assert main(["models"]) == 0
    assert "lenet5" in capsys.readouterr().out.split()
    assert main(["datasets"]) == 0
    assert "digits" in capsys.readouterr().out
    assert main(["configs"]) == 0
    assert "lenet5-digits" in capsys.readouterr().out


def test_bad_config_exits_2_with_message(capsys):
    from pipelines.cli import main

    assert main(["train", "lenet5-digits", "--set", "train.epochs=zero"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "'zero'" in err
