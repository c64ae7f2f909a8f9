"""Proven in a real browser: the HTML report's charts and the Dagster UI's `recommendations` asset page,
opened in headless Chromium (scripts/chromium_for_tests.sh installs it; without it these tests skip,
or fail when MODEL_EVAL_REQUIRE_BROWSER=1, as on CI).

Both look at a real project: two evaluation runs through a Dagster instance against the scripted
OpenAI-compatible server (a test double for hosted providers). Screenshots are kept in
build/test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from model_eval.settings import PROJECT_ROOT
from model_eval_tests.browser import artifact, browser_or_skip, chromium, console_errors, full_page_screenshot
from model_eval_tests.scripted_evaluation import TASKS, evaluate_twice

FIGURES_PER_TASK = 6  # accuracy, trends, latency and cost trade-offs, case grid, assignment timeline


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    browser_or_skip()  # no evaluation runs at all on a machine that cannot show them
    mp = pytest.MonkeyPatch()
    scripted = evaluate_twice(tmp_path_factory.mktemp("browser"), mp)
    yield scripted
    mp.undo()


def _wait(driver, condition, timeout: float = 60.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition, message=f"timed out waiting for {what}")


def test_report_charts_render_without_console_errors_and_show_answers_on_hover(project):
    report = project.paths.reports_dir / "latest.html"
    with chromium(1400, 1000) as driver:
        driver.get(report.as_uri())
        expected = FIGURES_PER_TASK * len(TASKS)
        # Drawn: every chart has its SVG with marks in it (bars, points, lines or the heatmap image),
        # not an empty frame. Counted in the page, so a chart that failed to draw keeps the count short.
        drawn = """return [...document.querySelectorAll('.js-plotly-plot')].filter(
            gd => gd.querySelector('svg.main-svg .trace path, svg.main-svg .hm image')).length"""
        _wait(driver, lambda d: d.execute_script(drawn) >= expected, what="every chart drawn")
        assert len(driver.find_elements("css selector", ".js-plotly-plot")) == expected
        assert console_errors(driver) == []

        # Hover the first cell of the first task's case grid: the expected and given answers appear.
        hover = driver.execute_script("""
            const gd = document.getElementById('task-0-cases');
            Plotly.Fx.hover(gd, {xval: 0, yval: 0});
            return gd.querySelector('.hoverlayer').textContent;""")
        assert "expected:" in hover and "answers:" in hover and "repeat" in hover
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(artifact("report-top.png")))
        full_page_screenshot(driver, artifact("report-full.png"))
        assert console_errors(driver) == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def dagster_ui(project, tmp_path):
    """`model-eval ui` on the project's Dagster instance (which holds the two runs), stopped afterwards."""
    port = _free_port()
    env = {**os.environ, **project.env, "DAGSTER_HOME": str(project.root / "dagster_home"), "DAGSTER_DISABLE_TELEMETRY": "1"}
    log = tmp_path / "ui.log"
    # A session of its own, so stopping it stops `dagster dev` and the webserver, daemon and code
    # server it starts, and nothing else.
    process = subprocess.Popen([sys.executable, "-m", "model_eval.cli", "ui", "--port", str(port)], cwd=PROJECT_ROOT, env=env,
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("model-eval ui did not come up:\n" + log.read_text()[-3000:])
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    assert process.returncode is not None


def _dismiss_welcome(driver) -> None:
    """A fresh instance greets the first visit with a newsletter dialog; skip it."""
    for button in driver.find_elements("xpath", "//button[normalize-space()='Skip']"):
        button.click()


def _click_plots_tab(driver) -> bool:
    """Click the asset page's Plots tab; False (try again) while a late dialog or re-render is in the way."""
    from selenium.common.exceptions import WebDriverException

    _dismiss_welcome(driver)
    try:
        driver.find_element("xpath", "//button[normalize-space()='Plots']").click()
    except WebDriverException:
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        ActionChains(driver).send_keys(Keys.ESCAPE).perform()  # a dialog without a Skip button closes on Escape
        return False
    return True


def test_recommendations_asset_page_shows_the_per_task_metadata_and_plots_it(project, dagster_ui):
    with chromium(1400, 1000) as driver:
        driver.get(f"{dagster_ui}/assets/recommendations")
        _wait(driver, lambda d: "grading/champion_accuracy_low" in d.find_element("tag name", "body").text,
              timeout=180, what="the per-task metadata on the asset page")
        _dismiss_welcome(driver)
        text = driver.find_element("tag name", "body").text
        for task in TASKS:
            for key in ("champion_accuracy", "champion_accuracy_low", "champion_p95_latency_ms", "champion_cost_per_case_usd"):
                assert f"{task}/{key}" in text
        assert str(project.paths.reports_dir) in text  # the report's path
        driver.save_screenshot(str(artifact("asset-page-metadata.png")))

        # The UI's own plots of the float metadata across the two materializations.
        _wait(driver, _click_plots_tab, timeout=120, what="the Plots tab to take a click")
        _wait(driver, lambda d: "grading/champion_accuracy" in d.find_element("tag name", "body").text
              and d.find_elements("css selector", "canvas, svg.recharts-surface"), timeout=120, what="the metadata plots")
        heading = driver.find_element("xpath", "//*[normalize-space()='Metadata']")
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", heading)
        driver.save_screenshot(str(artifact("asset-page-plots.png")))
