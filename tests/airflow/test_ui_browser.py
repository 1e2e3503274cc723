"""The Airflow UI in headless Chromium: the trigger form of recap_pipeline, filled and submitted in the
browser, the run it creates, and that run's quality report tab (the recap_reports plugin).
Screenshots go to test-artifacts/airflow-ui/."""

import json
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


def _screenshot(browser, name: str) -> None:
    """What the browser shows now, as test-artifacts/airflow-ui/<name>."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / name))


def _login(browser, af) -> None:
    # The UI keeps its JWT in the `_token` cookie; a token from POST /auth/token is the same kind.
    browser.get(af.url + "/api/v2/monitor/health")
    browser.add_cookie({"name": "_token", "value": af.token, "path": "/"})


def _wait_for(browser, by, selector, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while not browser.find_elements(by, selector):
        assert time.monotonic() < deadline, f"no {selector} on {browser.current_url}"
        time.sleep(0.5)
    return browser.find_element(by, selector)


def _type(browser, by, selector, text: str) -> None:
    """Type `text` into a form field as a user would, a key at a time, until the field holds it (the
    form re-renders as it validates, and a keystroke sent during a render can be lost)."""
    from selenium.webdriver.common.keys import Keys

    value = None
    for _ in range(3):
        field = _wait_for(browser, by, selector)
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.BACKSPACE)
        for key in text:
            browser.find_element(by, selector).send_keys(key)
        value = browser.find_element(by, selector).get_attribute("value")
        if value == text:
            return
    raise AssertionError(f"{selector} holds {value!r}, not {text!r}")


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


FORM_FIELDS = ("Source", "Shard limit", "Source kind", "Lake", "Captioning model", "Batch size", "Filter profile",
               "Runner", "Dry run")


def _fresh_shard(path):
    """Four photos of noise (each its own pHash) with English captions of their own."""
    import io

    import numpy as np
    from PIL import Image

    from tests.helpers import sample, write_tar

    rng = np.random.default_rng(2026)
    colours = ["red", "green", "blue", "yellow"]
    members = []
    for i, colour in enumerate(colours):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
        members += sample(f"{i:09d}", f"a grainy photograph of {colour} static noise on an old television screen",
                          image=buf.getvalue())
    return write_tar(path, members)


@pytest.fixture(scope="module")
def form_run(browser, airflow_services, sample_shards, tmp_path_factory) -> dict:
    """recap_pipeline triggered from its form in the browser: the source and batch size typed in,
    every other field left at its default (the lake is RECAP_LAKE, whose reports the UI serves).
    The source is a shard of images no other test puts in that lake (the corpus dedup would drop
    copies of the sample shards the REST test published), so the run has rows to publish whatever
    ran before it. Returns the form's text, what was typed, and the finished run (REST, with its
    task states)."""
    from selenium.webdriver.common.by import By

    source = _fresh_shard(tmp_path_factory.mktemp("form-shards") / "00000.tar")

    af = airflow_services
    _login(browser, af)
    browser.get(af.url + "/dags/recap_pipeline")
    _wait_text(browser, By.TAG_NAME, "body", "recap_pipeline")
    _wait_for(browser, By.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click()
    form = _wait_text(browser, By.TAG_NAME, "body", "Run Parameters")
    typed = {"source": str(source), "batch_size": 4}
    _type(browser, By.ID, "element_source", typed["source"])
    _type(browser, By.NAME, "element_batch_size", str(typed["batch_size"]))
    _screenshot(browser, "trigger-form.png")
    submit = [b for b in browser.find_elements(By.CSS_SELECTOR, "[role='dialog'] button")
              if b.text.strip() == "Trigger"]
    assert len(submit) == 1 and submit[0].is_enabled(), "no enabled Trigger button in the form"
    submit[0].click()
    # The UI opens the new run's page: its id is in the address.
    deadline = time.monotonic() + 60
    while "/dags/recap_pipeline/runs/" not in browser.current_url:
        assert time.monotonic() < deadline, f"the form did not open a run: {browser.current_url}"
        time.sleep(0.5)
    run_id = urllib.parse.unquote(browser.current_url.split("/dags/recap_pipeline/runs/", 1)[1].split("/")[0])
    _screenshot(browser, "triggered-run.png")
    run = af.wait_run("recap_pipeline", run_id)
    return {"form": form, "typed": typed, "run": run}


def test_trigger_form_submits_a_run_with_its_parameters(form_run, airflow_services):
    for field in FORM_FIELDS:
        assert field in form_run["form"], field
    # Fields with a default are not marked required: the form marks every param whose type
    # leaves out "null" as required.
    params = airflow_services.request("GET", "/api/v2/dags/recap_pipeline/details")["params"]
    for name in ("shard_limit", "dry_run", "batch_size"):
        assert "null" in params[name]["schema"]["type"], (name, params[name])
    run, typed = form_run["run"], form_run["typed"]
    assert run["run_type"] == "manual" and run["state"] == "success", (run, airflow_services.logs())
    # The conf is the whole form: what was typed, and every other parameter at its default.
    assert {k: run["conf"][k] for k in typed} == typed
    assert run["conf"]["lake"] == str(airflow_services.lake) and run["conf"]["dry_run"] is False
    assert run["conf"]["runner"] == "local" and run["conf"]["shard_limit"] == 0
    assert run["tasks"]["publish[-1]"] == "success" and run["tasks"]["report[-1]"] == "success", run["tasks"]


def test_run_opens_its_quality_report_inside_the_ui(browser, airflow_services, form_run):
    from selenium.webdriver.common.by import By

    af = airflow_services
    assert form_run["run"]["state"] == "success", af.logs()
    published_run = form_run["run"]["dag_run_id"]
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
    _screenshot(browser, "run-quality-report.png")
    assert "No quality report yet" not in report

    browser.get(f"{af.url}/recap/reports")
    _wait_text(browser, By.TAG_NAME, "body", "Recap quality reports")
    _screenshot(browser, "report-index.png")


def test_failure_line_is_the_recap_error_or_the_exception_message():
    """What a failed run's tab shows for each failed task: the last `recap ...` error line of its log
    (JSON lines as Airflow 3 writes them, or plain text), else the exception's one-line message."""
    import json

    from recap_airflow.ui import failure_line

    logged = [json.dumps({"level": "info", "event": "recap: 3 shards"}),
              json.dumps({"level": "error", "event": "recap: source not found: /nope"}),
              json.dumps({"level": "error", "event": "Task failed with exception", "error_detail": [
                  {"exc_type": "AirflowFailException", "exc_value": "source not found: /nope"}]}),
              json.dumps({"level": "info", "event": "::endgroup::"})]
    assert failure_line(logged) == "recap: source not found: /nope"
    assert failure_line(["recap caption: error: no such model: x", "Traceback (most recent call last):"]) == \
        "recap caption: error: no such model: x"
    assert failure_line([json.dumps({"level": "error", "event": "Task failed with exception", "error_detail": [
        {"exc_type": "ValueError", "exc_value": "boom\nsecond line"}]})]) == "ValueError: boom"
    assert failure_line(["all fine"]) is None


def _open_run_tab(browser, af, dag_id: str, run_id: str):
    """The run's "Quality report" tab, switched into its embedded (sandboxed) view."""
    from selenium.webdriver.common.by import By

    _login(browser, af)
    browser.get(f"{af.url}/dags/{dag_id}/runs/{urllib.parse.quote(run_id, safe='')}/plugin/recap-quality-report")
    frame = _wait_for(browser, By.TAG_NAME, "iframe")
    assert "allow-top-navigation" not in (frame.get_attribute("sandbox") or "")
    browser.switch_to.frame(frame)


def test_a_failed_runs_tab_shows_the_error_and_opens_the_task_log(browser, airflow_services, tmp_path):
    from selenium.webdriver.common.by import By

    af = airflow_services
    missing = tmp_path / "no-such-folder"
    run_id = af.trigger("recap_pipeline", {"source": str(missing)})
    run = af.wait_run("recap_pipeline", run_id, timeout=300)
    assert run["state"] == "failed" and run["tasks"]["plan[-1]"] == "failed", run
    _open_run_tab(browser, af, "recap_pipeline", run_id)
    try:
        page = _wait_text(browser, By.TAG_NAME, "body", f"Run {run_id} failed")
        assert f"plan: recap: error: source not found: {missing}" in page, page  # the log's last line
        link = browser.find_element(By.LINK_TEXT, "plan")
        link.click()
    finally:
        browser.switch_to.default_content()
    # The link opens the task's log in the UI (the frame may not navigate the page itself).
    deadline = time.monotonic() + 30
    while "/tasks/plan" not in urllib.parse.unquote(browser.current_url):
        assert time.monotonic() < deadline, f"the link did not open the task: {browser.current_url}"
        time.sleep(0.5)
    assert urllib.parse.unquote(browser.current_url).endswith(f"/dags/recap_pipeline/runs/{run_id}/tasks/plan")
    _wait_text(browser, By.TAG_NAME, "body", f"recap: source not found: {missing}", timeout=60)
    _screenshot(browser, "failed-run-task-log.png")
    # The one-line error is the last thing in the task's log, after Airflow's traceback.
    logs = sorted(p for p in (af.home / "logs").rglob("*.log")
                  if f"run_id={run_id}" in p.parts and "task_id=plan" in p.parts)
    events = [json.loads(line).get("event", "") for line in logs[-1].read_text().splitlines() if line.startswith("{")]
    events = [e for e in events if e.strip() and not e.startswith("::")]  # ::group:: markers fold the UI's log
    assert events[-1] == f"recap: error: source not found: {missing}", events[-5:]


def test_a_no_op_incremental_runs_tab_says_nothing_new(browser, airflow_services, form_run):
    """recap_incremental over the source the form's run already ingested: nothing is new, the stages
    after `has_work` are skipped, and the tab says so (not "has not finished")."""
    from selenium.webdriver.common.by import By

    af = airflow_services
    run_id = af.trigger("recap_incremental", {"source": form_run["typed"]["source"]})
    run = af.wait_run("recap_incremental", run_id, timeout=300)
    assert run["state"] == "success" and run["tasks"]["report[-1]"] == "skipped", run
    _open_run_tab(browser, af, "recap_incremental", run_id)
    try:
        page = _wait_text(browser, By.TAG_NAME, "body", f"Nothing new in run {run_id}")
        assert "has not finished" not in page and "`" not in page
    finally:
        browser.switch_to.default_content()
    _screenshot(browser, "no-op-incremental-run.png")


def test_data_docs_render_styled_without_network(airflow_services, form_run, tmp_path):
    """The lake's Data Docs through the plugin, in a Chromium that resolves no host but 127.0.0.1:
    every resource comes from the api-server, the stylesheets load, the index's table is filled."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    from tests.airflow.browser import CHROMEDRIVER, CHROMIUM

    af = airflow_services
    assert form_run["run"]["state"] == "success"
    docs = af.lake / "_reports" / "data_docs"
    result = max(docs.glob("validations/**/*.html"), key=lambda p: p.stat().st_mtime).relative_to(docs)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"):
        options.add_argument(arg)
    offline = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        _login(offline, af)
        for page, name in (("index.html", "data-docs-index"), (result.as_posix(), "data-docs-validation")):
            started = time.monotonic()
            offline.get(f"{af.url}/recap/lake/data_docs/{urllib.parse.quote(page)}")
            _wait_for(offline, By.CSS_SELECTOR, "nav.navbar")
            assert time.monotonic() - started < 10, "the page waited for something it could not fetch"
            seen = offline.execute_script(
                "return {resources: performance.getEntriesByType('resource').map(r => r.name),"
                " sheets: Array.from(document.styleSheets).map(s => [s.href, s.cssRules.length]),"
                " row: getComputedStyle(document.querySelector('.row')).display,"
                " logo: Array.from(document.images).filter(i => i.src.includes('logo')).map(i => [i.src, i.naturalWidth]),"
                " rows: document.querySelectorAll('tbody tr').length}")
            assert seen["resources"] and all(r.startswith(af.url + "/") for r in seen["resources"]), seen
            assert [n for h, n in seen["sheets"] if h and h.endswith("/static/recap/offline.css")][0] > 50, seen
            assert seen["row"] == "flex", seen  # the grid is styled
            assert all(width > 0 for _, width in seen["logo"]), seen
            assert seen["rows"] >= 1, seen  # index: its table rendered from the page's data
            _screenshot(offline, f"{name}.png")
    finally:
        offline.quit()
