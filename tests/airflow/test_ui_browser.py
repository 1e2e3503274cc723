"""The Airflow UI in headless Chromium: the trigger form of recap_pipeline and a run's quality report
tab (the recap_reports plugin). Screenshots go to test-artifacts/airflow-ui/."""

import time
import urllib.parse

import pytest

from tests.airflow.browser import browser_available, headless_chromium
from tests.helpers import REPO

pytestmark = pytest.mark.slow

ARTIFACTS = REPO / "test-artifacts" / "airflow-ui"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = browser_available()
    if reason:
        pytest.skip(reason)
    driver = headless_chromium(str(tmp_path_factory.mktemp("chromium-profile")))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def published_run(airflow_services, sample_shards, tiny_model) -> str:
    """A successful recap_pipeline run (the REST test's, or one triggered here)."""
    af = airflow_services
    runs = af.request("GET", "/api/v2/dags/recap_pipeline/dagRuns?state=success&limit=1")["dag_runs"]
    if runs:
        return runs[0]["dag_run_id"]
    run_id = af.trigger("recap_pipeline", {"source": str(sample_shards), "lake": str(af.lake),
                                           "model": str(tiny_model), "batch_size": 4})
    assert af.wait_run("recap_pipeline", run_id)["state"] == "success", af.logs()
    return run_id


def _login(browser, af) -> None:
    # The UI keeps its JWT in the `_token` cookie; a token from POST /auth/token is the same kind.
    browser.get(af.url + "/api/v2/monitor/health")
    browser.add_cookie({"name": "_token", "value": af.token, "path": "/"})


def _wait_text(browser, by, selector, text: str, timeout: float = 60) -> str:
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        try:
            seen = browser.find_element(by, selector).text
        except WebDriverException:
            seen = ""
        if text in seen:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"{text!r} did not appear in {selector}: {seen[-2000:]!r}")


def test_trigger_form_shows_the_run_parameters(browser, airflow_services):
    from selenium.webdriver.common.by import By

    _login(browser, airflow_services)
    browser.get(airflow_services.url + "/dags/recap_pipeline")
    _wait_text(browser, By.TAG_NAME, "body", "recap_pipeline")
    deadline = time.monotonic() + 30
    while not browser.find_elements(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']"):
        assert time.monotonic() < deadline, "no Trigger button"
        time.sleep(0.5)
    browser.find_element(By.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click()
    form = _wait_text(browser, By.TAG_NAME, "body", "Run Parameters")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "trigger-form.png"))
    for field in ("Source", "Shard limit", "Captioning model", "Batch size", "Filter profile", "Runner", "Dry run"):
        assert field in form, field


def test_run_opens_its_quality_report_inside_the_ui(browser, airflow_services, published_run):
    from selenium.webdriver.common.by import By

    af = airflow_services
    _login(browser, af)
    run = urllib.parse.quote(published_run, safe="")
    browser.get(f"{af.url}/dags/recap_pipeline/runs/{run}/plugin/recap-quality-report")
    _wait_text(browser, By.TAG_NAME, "body", "Quality report")
    deadline = time.monotonic() + 30
    while not browser.find_elements(By.TAG_NAME, "iframe"):
        assert time.monotonic() < deadline, "the report tab has no embedded view"
        time.sleep(0.5)
    frame = browser.find_element(By.TAG_NAME, "iframe")
    assert frame.get_attribute("src").endswith(f"/recap/runs/recap_pipeline/{run}")
    browser.switch_to.frame(frame)
    try:
        report = _wait_text(browser, By.TAG_NAME, "body", "Recap quality report")
        # The report's links work inside the UI: to the index of all runs, and back to a run.
        browser.find_element(By.LINK_TEXT, "all runs").click()
        index = _wait_text(browser, By.TAG_NAME, "body", "Recap quality reports")
        assert "Trends across runs" in index
        browser.find_element(By.LINK_TEXT, published_run).click()
        back = _wait_text(browser, By.TAG_NAME, "body", f"Recap quality report: {published_run}")
        assert "No quality report" not in back and "Not found" not in back
    finally:
        browser.switch_to.default_content()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "run-quality-report.png"))
    assert "No quality report yet" not in report

    browser.get(f"{af.url}/recap/reports")
    _wait_text(browser, By.TAG_NAME, "body", "Recap quality reports")
    assert browser.save_screenshot(str(ARTIFACTS / "report-index.png"))
