"""The MLflow UI and the comparison report in a real browser: Debian's Chromium, headless,
driven through chromedriver. The run page shows the run, the registered model page its
champion alias, the report its plots; no screenshot is blank."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.ops.conftest import run_cli

pytestmark = [pytest.mark.browser, pytest.mark.server, pytest.mark.slow]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("Chromium is not installed (make ops-deps installs chromium, chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="deeptrends-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for_text(driver, *texts: str, timeout: float = 120) -> str:
    """The page's visible text once it contains every one of ``texts``."""
    deadline, body = time.time() + timeout, ""
    while time.time() < deadline:
        try:
            body = driver.find_element("tag name", "body").text
        except Exception:  # the page is still replacing its body
            body = ""
        if all(t in body for t in texts):
            return body
        time.sleep(1)
    raise AssertionError(
        f"page {driver.current_url} never showed {texts}; it shows:\n{body[:3000]}"
    )


def assert_not_blank(driver, path: Path) -> None:
    import numpy as np
    from matplotlib import image

    driver.save_screenshot(str(path))
    pixels = image.imread(str(path))[..., :3]
    assert pixels.std() > 0.02, f"{path} is blank"
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 20


def test_run_page_shows_the_run(browser, champion, tmp_path):
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=champion.server.url).get_run(champion.summary["run_id"])
    browser.get(
        f"{champion.server.url}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    )
    wait_for_text(browser, run.info.run_name, "eval_accuracy")
    assert_not_blank(browser, tmp_path / "run.png")


def test_registered_model_page_shows_the_champion(browser, champion, tmp_path):
    browser.get(f"{champion.server.url}/#/models/{champion.model_name}")
    body = wait_for_text(browser, champion.model_name, "champion")
    assert f"Version {champion.summary['model_version']}" in body
    assert_not_blank(browser, tmp_path / "model.png")


def test_comparison_report_renders_its_plots(browser, champion, tmp_path):
    out = tmp_path / "compare"
    done = run_cli(
        [
            "compare",
            champion.experiment,
            "--output",
            str(out),
            "--tracking-uri",
            champion.server.url,
        ],
        champion.server.client_env(),
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "logged them as artifacts" in done.stdout
    browser.get((out / "report.html").resolve().as_uri())
    wait_for_text(browser, "Gate decisions", "champion", "Parallel coordinates")
    images = browser.find_elements("tag name", "img")
    assert len(images) >= 3  # metric against param, parallel coordinates, learning curves
    for img in images:
        width = browser.execute_script("return arguments[0].naturalWidth", img)
        assert width > 100, img.get_attribute("alt")
    assert_not_blank(browser, tmp_path / "report.png")
    shutil.copy(tmp_path / "report.png", champion.workdir / "report.png")
