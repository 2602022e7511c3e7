"""The gateway's demo page (report 5.5), in a real browser against a real Redis on a trained run.

A briefly trained run (conftest's `trained_run`) is batch-scored and published to Redis DB 8 (this module's
own, flushed before and after) as the DAG does, its demo data written by `recsys demo-data` in the trainer
environment; the gateway runs under uvicorn on a free port and Debian's chromium, headless and driven by
Selenium, picks a user on the page. The page's final lists come from the precomputed route, so no Triton
server is needed here. The screenshot lands in tests/artifacts/demo.png (not committed).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from recsys.demo_format import DemoData, hits, read_demo_data
from recsys.recommendation_store import decode_recommendations
from recsys.settings import Settings, get_settings
from recsys.trainer_env import run_trainer_step
from serving.api.main import create_app
from serving.api.migrate import upgrade
from serving.api.routes.demo import demo_directory
from tasks.publish_recommendations import publish_recommendations
from tests.api_keys import authorized, new_key
from tests.redis_databases import redis_url
from tests.servers import free_port, served

REDIS_URL = redis_url("demo_page")
PREFIX = "demo-test:"
VERSION = "demo1"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


READ_KEY: dict[str, str] = {}  # the `server` fixture's key with the read scope

def gateway_settings(tmp_path: Path, **overrides: object) -> Settings:
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database_url)
    # Generous Redis budget on 2 busy cores; Triton is never reached (the demo users have nightly lists).
    values = {"database_url": database_url, "redis_url": REDIS_URL, "redis_key_prefix": PREFIX,
              "redis_timeout_ms": 2_000, "triton_url": f"http://127.0.0.1:{free_port()}", **overrides}  # fmt: skip
    return Settings(**values)  # type: ignore[arg-type]


# -- without a trained run: what the page says when it cannot show a user ---------------------------------


def test_without_demo_data_the_page_says_how_to_make_it(tmp_path: Path):
    settings = gateway_settings(tmp_path, data_root=tmp_path / "data")
    with authorized(TestClient(create_app(settings)), settings.database_url) as client:
        page = client.get("/demo")
    assert page.status_code == 503 and "text/html" in page.headers["content-type"]
    assert "recsys demo-data" in page.text and "<select" in page.text


def test_the_newest_demo_output_under_the_runs_is_the_default(tmp_path: Path):
    settings = Settings(data_root=tmp_path)
    assert demo_directory(settings) is None
    for run, mtime in (("old", 1_000), ("new", 2_000), ("older", 500)):
        metrics = tmp_path / "runs" / run / "demo" / "_metrics.json"
        metrics.parent.mkdir(parents=True)
        metrics.write_text("{}")
        os.utime(metrics, (mtime, mtime))
    assert demo_directory(settings) == tmp_path / "runs" / "new" / "demo"
    assert demo_directory(Settings(data_root=tmp_path, demo_dir=tmp_path / "elsewhere")) == tmp_path / "elsewhere"


# -- a trained run, published, in a browser ------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_run(trained_run: Path, batch_scored: Path) -> Iterator[tuple[DemoData, redis.Redis]]:
    python, run = get_settings().trainer_python, str(trained_run)
    metrics = run_trainer_step(python, "demo-data", ["--input", run, "--output", str(trained_run / "demo")])
    assert metrics["users"] > 0 and metrics["top_k"] == 200
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    publish_recommendations(batch_scored, redis_url=REDIS_URL, version=VERSION, key_prefix=PREFIX,
                            progress=False)  # fmt: skip
    yield read_demo_data(trained_run / "demo"), client
    client.flushdb()


@pytest.fixture(scope="module")
def server(demo_run: tuple[DemoData, redis.Redis], trained_run: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:  # fmt: skip
    """The gateway under uvicorn in a thread of this process, on a free port: its base URL (`READ_KEY` reads)."""
    settings = gateway_settings(tmp_path_factory.mktemp("demo_gateway"), demo_dir=trained_run / "demo")
    READ_KEY["X-API-Key"] = new_key(settings.database_url, ("read",))
    with served(create_app(settings)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # with both paths given, Selenium downloads nothing
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1300,1500"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def published_list(client: redis.Redis, user: int) -> list[int]:
    return decode_recommendations(client.get(f"{PREFIX}recs:{VERSION}:user:{user}"))[0]


def user_with_clicked_recommendations(demo: DemoData, client: redis.Redis) -> tuple[int, int]:
    """(user, count): the first demo user whose shortest list among 10, 20, 50, 100 holds a clicked item."""
    for count in (10, 20, 50, 100):
        for user in demo.users.values():
            if hits(published_list(client, user.user_id)[:count], user.clicked):
                return user.user_id, count
    raise AssertionError("no demo user has a clicked item in their first 100 recommendations")


@pytest.mark.e2e
def test_a_user_picked_in_the_browser_shows_recommendations_with_clicked_items_highlighted(
    demo_run: tuple[DemoData, redis.Redis], server: str, browser
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.wait import WebDriverWait

    demo, client = demo_run
    user_id, count = user_with_clicked_recommendations(demo, client)
    user = demo.users[user_id]
    final = published_list(client, user_id)[:count]

    # The page needs the read scope, as the recommendations it shows do: a plain browser (no header injected)
    # gets the sign-in form, and the key typed there once is kept in the page's cookie.
    browser.get(f"{server}/demo")
    assert browser.title == "Sign in · Recommender demo"
    browser.find_element(By.ID, "api_key").send_keys("rk_not-a-key")
    browser.find_element(By.ID, "login").click()
    # The click submits the form; the answer is a new page, so wait for it rather than read the old one.
    problem = WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, "problem")))
    assert "Unknown or revoked" in problem.text
    browser.find_element(By.ID, "api_key").send_keys(READ_KEY["X-API-Key"])
    browser.find_element(By.ID, "login").click()
    WebDriverWait(browser, 30).until(expected_conditions.title_is("Recommender demo"))
    cookie = browser.get_cookie("recsys_demo_key")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/demo"
    assert browser.execute_script("return document.cookie") == ""  # the page's scripts cannot read the key
    assert not browser.find_elements(By.ID, "recommendations")  # nobody picked yet
    picker = Select(browser.find_element(By.ID, "user"))
    assert [int(option.get_attribute("value")) for option in picker.options if option.get_attribute("value")] == list(
        demo.users
    )
    picker.select_by_value(str(user_id))
    count_field = browser.find_element(By.ID, "count")
    count_field.clear()
    count_field.send_keys(str(count))
    browser.find_element(By.ID, "show").click()
    WebDriverWait(browser, 30).until(expected_conditions.presence_of_element_located((By.ID, "recommendations")))

    assert f"user={user_id}" in browser.current_url
    rows = browser.find_elements(By.CSS_SELECTOR, "#recommendations tbody tr")
    assert [int(row.get_attribute("data-item")) for row in rows] == final
    highlighted = browser.find_elements(By.CSS_SELECTOR, "#recommendations tbody tr.clicked")
    assert highlighted, "no recommended item is highlighted as clicked"
    assert {int(row.get_attribute("data-item")) for row in highlighted} == set(final) & user.clicked
    retrieved = browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr")
    assert [int(row.get_attribute("data-item")) for row in retrieved] == user.candidates
    marked = {int(row.get_attribute("data-item")) for row in
              browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr.clicked")}  # fmt: skip
    assert marked == set(user.candidates) & user.clicked
    # The highlight is visible, not only a class name: the style sheet colours clicked rows.
    plain = browser.find_element(By.CSS_SELECTOR, "#recommendations tr.not-clicked td, #candidates tr.not-clicked td")
    assert highlighted[0].find_element(By.TAG_NAME, "td").value_of_css_property("background-color") != (
        plain.value_of_css_property("background-color")
    )
    assert browser.find_element(By.ID, "precision").text == f"{100 * len(highlighted) / len(final):.1f}%"
    assert browser.find_element(By.ID, "recall").text == f"{100 * len(marked) / len(user.clicked):.2f}%"

    # Nothing is loaded from elsewhere (no CDN): every resource the browser fetched came from the gateway.
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(url.startswith(server) for url in resources), resources
    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "demo.png"))


@pytest.mark.e2e
def test_the_page_is_self_contained_and_refuses_unknown_users(demo_run: tuple[DemoData, redis.Redis], server: str):
    demo, _ = demo_run
    user = next(iter(demo.users))
    refused = httpx.get(f"{server}/demo", timeout=30)
    assert refused.status_code == 401 and 'id="api_key"' in refused.text  # the sign-in form, not the page
    page = httpx.get(f"{server}/demo", params={"user": user, "temperature": 0.05}, headers=READ_KEY, timeout=30)
    assert page.status_code == 200
    assert not re.search(r"https?:|//[a-z0-9]|@import|<script|<link", page.text, re.IGNORECASE), "external reference"
    assert page.text.count('<th class="number">probability</th>') == 1  # sampled: probabilities shown
    unknown = httpx.get(f"{server}/demo", params={"user": max(demo.users) + 10_000}, headers=READ_KEY, timeout=30)
    assert unknown.status_code == 404 and "not among the demo users" in unknown.text
    assert json.loads((Path(demo.directory) / "_metrics.json").read_text())["users"] == len(demo.users)


def test_the_sign_in_form_keeps_a_read_key_in_a_cookie_only_the_demo_accepts(tmp_path: Path):
    settings = gateway_settings(tmp_path, data_root=tmp_path / "data")
    reader, writer = new_key(settings.database_url, ("read",)), new_key(settings.database_url, ("ingest",))
    with TestClient(create_app(settings), follow_redirects=False) as client:
        assert client.get("/demo").status_code == 401
        assert client.post("/demo/session", data={"api_key": "rk_not-a-key"}).status_code == 401
        lacking = client.post("/demo/session", data={"api_key": writer})
        assert lacking.status_code == 403 and "lacks the read scope" in lacking.text and not client.cookies
        signed_in = client.post("/demo/session", data={"api_key": reader})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/demo"
        cookie = signed_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/demo" in cookie
        page = client.get("/demo")  # the cookie, no header
        assert page.status_code == 503 and "recsys demo-data" in page.text  # the page itself (no demo data here)
        # Other routes take the header only, even when the cookie is sent to them.
        assert client.get("/recommendations/1", headers={"Cookie": f"recsys_demo_key={reader}"}).status_code == 401
        client.post("/demo/logout")
        assert client.get("/demo").status_code == 401
