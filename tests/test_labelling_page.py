"""The labelling page in headless Chromium (Playwright driving Debian's /usr/bin/chromium).

A person's session end to end: enter an annotator id, label tasks by mouse and by keyboard,
rank, rate, correct, skip, double-click submit, lose the connection; then what was stored is
checked through the gRPC API. Skipped, with the reason, only where no Chromium is installed
(``make setup`` installs it); Playwright never downloads a browser of its own.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from playwright.sync_api import Browser, Locator, Page, Request, expect, sync_playwright

from plaudit.services.feedback.store import FeedbackStore
from plaudit.v1 import feedback_pb2 as pb
from plaudit.v1 import feedback_pb2_grpc
from tests.conftest import ServerThread

CHROMIUM = os.environ.get("PLAUDIT_CHROMIUM", "/usr/bin/chromium")

pytestmark = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"no Chromium at {CHROMIUM}: `make setup` installs Debian's chromium "
    "(or set PLAUDIT_CHROMIUM to a Chromium executable)",
)

TASKS: list[dict[str, Any]] = [
    {"prompt": "Skip me?", "completions": ["yes", "no"]},
    {
        "prompt": "\n\nHuman: How do I keep basil alive?\n\nAssistant:",
        "completions": ["Water it daily and hope.", "Give it sun, and pinch off the flowers."],
    },
    {"prompt": "Capital of France?", "completions": ["Paris.", "Lyon."]},
    {"prompt": "Order these greetings", "completions": ["Hello there.", "Yo.", "Good morning!"]},
    {"prompt": "Best first step when debugging?", "completions": ["Panic.", "Reproduce it."]},
    {"prompt": "Fix the typo", "completions": ["Teh quick brown fox.", "Quick fox."]},
    {"prompt": "Rate these haiku", "completions": ["Old pond, frog jumps in.", "Roses are red."]},
]
SKIPPED, MOUSE, KEYBOARD, RANKED, DOUBLE, EDITED, RATED = range(len(TASKS))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    yield tab
    context.close()


def post_json(url: str, body: Any) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def wait_for_task(page: Page, task_id: int) -> None:
    expect(page.locator("#task-id")).to_have_text(f"Task {task_id}")


def card(page: Page, index: int) -> Locator:
    return page.locator(f'.completion[data-index="{index}"]')


def test_a_labelling_session_stores_each_label_once(page: Page, database_url: str) -> None:
    server = ServerThread(
        "feedback", database_url=database_url, labels_per_task=1, log_level="WARNING"
    ).start()
    try:
        base = server.http_url
        ids = [t["task_id"] for t in post_json(f"{base}/api/v1/tasks", {"tasks": TASKS})["tasks"]]
        comparison_posts: list[str] = []

        def remember(request: Request) -> None:
            if request.method == "POST" and request.url.endswith("/api/v1/comparisons"):
                comparison_posts.append(json.loads(request.post_data or "{}")["prompt"])

        page.on("request", remember)
        page.goto(base + "/")

        # first visit: the annotator id is asked once and kept
        expect(page.locator("#login")).to_be_visible()
        page.fill("#annotator-input", "alice")
        page.press("#annotator-input", "Enter")
        expect(page.locator("#annotator-name")).to_have_text("alice")
        wait_for_task(page, ids[SKIPPED])
        assert page.evaluate("localStorage.getItem('plaudit.annotator')") == "alice"

        page.keyboard.press("s")  # skip
        wait_for_task(page, ids[MOUSE])
        expect(page.locator(".turn.human .said")).to_have_text("How do I keep basil alive?")
        page.get_by_role("button", name="Prefer B").click()  # by mouse, with a comment
        expect(card(page, 1)).to_have_class("completion chosen")
        page.fill("#comment", "B explains why.")
        page.click("#submit")

        wait_for_task(page, ids[KEYBOARD])
        expect(page.locator("#progress-text")).to_contain_text("1 labelled · 1 skipped")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowLeft")  # by keyboard: left is A
        expect(card(page, 0)).to_have_class("completion chosen")
        page.keyboard.press("Enter")

        wait_for_task(page, ids[RANKED])  # three completions: rank by clicking, best first
        expect(page.locator("#mode-choose")).to_have_text("Rank")
        card(page, 2).locator(".text").click()
        card(page, 0).locator(".text").click()  # the last one ranks itself
        expect(card(page, 1).locator(".badge")).to_have_text("#3")
        page.click("#submit")

        wait_for_task(page, ids[DOUBLE])
        page.keyboard.press("2")
        page.dblclick("#submit")  # a double click submits once

        wait_for_task(page, ids[EDITED])
        page.keyboard.press("e")  # edit response A into a correction
        editor = card(page, 0).locator("textarea")
        expect(editor).to_be_focused()
        editor.fill("The quick brown fox.")
        page.keyboard.press("Control+Enter")

        wait_for_task(page, ids[RATED])
        page.keyboard.press("r")  # rate both on 1-5 by keyboard
        page.keyboard.press("4")
        page.keyboard.press("2")
        expect(card(page, 1).locator(".badge")).to_have_text("2 / 5")
        page.keyboard.press("Enter")

        expect(page.locator("#empty")).to_be_visible()
        expect(page.locator("#progress-text")).to_contain_text("6 labelled · 1 skipped")
        page.reload()  # the annotator is remembered
        expect(page.locator("#empty")).to_be_visible()
        expect(page.locator("#login")).to_be_hidden()

        assert comparison_posts.count(TASKS[DOUBLE]["prompt"]) == 1
        with grpc.insecure_channel(server.address) as channel:
            stub = feedback_pb2_grpc.FeedbackServiceStub(channel)
            stats = stub.GetStats(pb.GetStatsRequest(), timeout=10)
            pages = stub.ExportPreferences(pb.ExportPreferencesRequest(), timeout=10)
            pairs = [(p.prompt, p.chosen, p.rejected) for page_ in pages for p in page_.pairs]
        assert dict(stats.records_by_kind) == {
            "comparison": 3,
            "ranking": 1,
            "correction": 1,
            "rating": 2,
        }
        assert [a.annotator_id for a in stats.annotators] == ["alice"]
        prompt = [t["prompt"] for t in TASKS]
        completions = [t["completions"] for t in TASKS]
        assert sorted(pairs) == sorted(
            [
                (prompt[MOUSE], completions[MOUSE][1], completions[MOUSE][0]),
                (prompt[KEYBOARD], "Paris.", "Lyon."),
                (prompt[RANKED], "Good morning!", "Hello there."),
                (prompt[RANKED], "Good morning!", "Yo."),
                (prompt[RANKED], "Hello there.", "Yo."),
                (prompt[DOUBLE], "Reproduce it.", "Panic."),
                (prompt[EDITED], "The quick brown fox.", "Teh quick brown fox."),
                (prompt[RATED], "Old pond, frog jumps in.", "Roses are red."),
            ]
        )
        with FeedbackStore(database_url, migrate=False) as store:
            events = [store.get(i).event for i in range(1, stats.records + 1)]
        [mouse] = [e for e in events if e.prompt == prompt[MOUSE]]
        assert mouse.metadata["comment"] == "B explains why."
        assert mouse.metadata["task_id"] == str(ids[MOUSE])
        # the task, the kind and 128 random bits: nobody else can guess it (auth off: unscoped)
        assert re.fullmatch(rf"t{ids[MOUSE]}\.comparison\.[0-9a-f]{{32}}", mouse.idempotency_key)
        keyboard = next(e for e in events if e.prompt == prompt[KEYBOARD])
        assert keyboard.idempotency_key.split(".")[-1] != mouse.idempotency_key.split(".")[-1]
        with urllib.request.urlopen(f"{base}/api/v1/stats?annotator_id=alice") as response:
            tasks = json.loads(response.read())["tasks"]
        assert tasks["pending"] == 1 and tasks["annotator"] == {"labelled": 6, "skipped": 1}
    finally:
        server.stop()


def test_losing_the_service_says_so_and_a_retry_stores_once(page: Page, tmp_path: Any) -> None:
    server = ServerThread(
        "feedback", database_url=f"sqlite:///{tmp_path / 'f.db'}", log_level="ERROR"
    ).start()
    try:
        base = server.http_url
        imported = post_json(f"{base}/api/v1/tasks", {"tasks": TASKS[:2]})["tasks"]
        first, second = (t["task_id"] for t in imported)
        page.add_init_script("localStorage.setItem('plaudit.annotator', 'bob')")
        page.goto(base + "/")
        wait_for_task(page, first)
        page.route("**/api/v1/comparisons", lambda route: route.abort())  # the network drops
        page.keyboard.press("1")
        page.keyboard.press("Enter")
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner-text")).to_contain_text("Cannot reach the feedback service")
        expect(page.locator("#submit")).to_be_enabled()
        page.unroute("**/api/v1/comparisons")
        page.click("#banner-retry")  # the same label again: stored once
        wait_for_task(page, second)
        expect(page.locator("#banner")).to_be_hidden()
        with grpc.insecure_channel(server.address) as channel:
            stats = feedback_pb2_grpc.FeedbackServiceStub(channel).GetStats(
                pb.GetStatsRequest(), timeout=10
            )
        assert stats.records == 1
    finally:
        server.stop()


def test_a_database_outage_is_shown_clearly(page: Page) -> None:
    server = ServerThread(
        "feedback",
        database_url="postgresql://postgres@127.0.0.1:1/test",
        health_interval_s=0.2,
        log_level="ERROR",
    ).start(wait=False)
    try:
        page.add_init_script("localStorage.setItem('plaudit.annotator', 'carol')")
        page.goto(server.http_url + "/")
        expect(page.locator("#banner")).to_be_visible()
        expect(page.locator("#banner-text")).to_contain_text("unavailable right now")
        expect(page.locator("#task")).to_be_hidden()
    finally:
        server.stop()


def test_a_service_with_api_keys_asks_for_one_and_sends_it(page: Page, tmp_path: Any) -> None:
    """Without a key the page says so and asks; the key entered is kept and sent as a header.
    The key is dora's own (bound to the annotator of its name), so she labels as dora."""
    from plaudit.services.common.security.keys import hash_key, new_api_key

    key = new_api_key()
    entry = {"name": "dora", "sha256": hash_key(key), "roles": ["submit_feedback"]}
    server = ServerThread(
        "feedback",
        database_url=f"sqlite:///{tmp_path / 'f.db'}",
        api_keys=[entry],
        log_level="ERROR",
    ).start()
    try:
        base = server.http_url
        request = urllib.request.Request(
            f"{base}/api/v1/tasks",
            data=json.dumps({"tasks": TASKS[2:3]}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            (task,) = json.loads(response.read())["tasks"]
        page.add_init_script("localStorage.setItem('plaudit.annotator', 'dora')")
        page.goto(base + "/")
        expect(page.locator("#banner-text")).to_contain_text("needs a valid API key")
        expect(page.locator("#login")).to_be_visible()
        page.fill("#api-key-input", key)
        page.press("#annotator-input", "Enter")
        wait_for_task(page, task["task_id"])
        expect(page.locator("#banner")).to_be_hidden()
        with page.expect_request("**/api/v1/comparisons") as sent:
            page.keyboard.press("1")
            page.keyboard.press("Enter")
        assert sent.value.headers["authorization"] == f"Bearer {key}"
        expect(page.locator("#empty")).to_be_visible()
        assert page.evaluate("localStorage.getItem('plaudit.apiKey')") == key
    finally:
        server.stop()


def test_two_criteria_ask_two_questions_and_store_one_event_each(page: Page, tmp_path: Any) -> None:
    """With criteria helpfulness and safety a two-response task asks both questions (labelled
    radio groups, answered by mouse or keyboard); each answered one is stored as its own
    comparison, an unanswered one is left out, and a ranking judges ``overall``."""
    database_url = f"sqlite:///{tmp_path / 'f.db'}"
    server = ServerThread(
        "feedback",
        database_url=database_url,
        labels_per_task=1,
        criteria=["helpfulness", "safety"],
        log_level="WARNING",
    ).start()
    tasks = [
        {"prompt": "How do I sharpen a knife?", "completions": ["Use a whetstone.", "Don't."]},
        {"prompt": "Is it safe to eat raw flour?", "completions": ["Yes, always.", "No."]},
        TASKS[RANKED],
    ]
    try:
        base = server.http_url
        ids = [t["task_id"] for t in post_json(f"{base}/api/v1/tasks", {"tasks": tasks})["tasks"]]
        page.add_init_script("localStorage.setItem('plaudit.annotator', 'erin')")
        page.goto(base + "/")
        wait_for_task(page, ids[0])
        helpful = page.get_by_role("radiogroup", name="Which response is more helpful?")
        safer = page.get_by_role("radiogroup", name="Which response is safer?")
        expect(helpful).to_be_visible()
        expect(safer).to_be_visible()
        expect(page.get_by_role("button", name="Prefer A")).to_have_count(0)
        helpful.get_by_role("radio", name="Response A").click()  # by mouse
        expect(helpful.get_by_role("radio", name="Response A")).to_have_attribute(
            "aria-checked", "true"
        )
        page.keyboard.press("ArrowDown")  # by keyboard: the next question, then B
        page.keyboard.press("2")
        expect(safer.get_by_role("radio", name="Response B")).to_have_attribute(
            "aria-checked", "true"
        )
        expect(card(page, 0).locator(".badge")).to_have_text("Preferred: helpfulness")
        page.keyboard.press("Enter")

        wait_for_task(page, ids[1])
        page.keyboard.press("Enter")  # nothing answered yet
        expect(page.locator("#status")).to_have_text("Answer at least one question first.")
        page.keyboard.press("2")  # helpfulness: B; safety stays unanswered
        page.keyboard.press("Enter")

        wait_for_task(page, ids[2])  # three responses: a ranking, no questions
        expect(page.locator("#questions")).to_be_hidden()
        card(page, 2).locator(".text").click()
        card(page, 0).locator(".text").click()
        page.click("#submit")
        expect(page.locator("#empty")).to_be_visible()
    finally:
        server.stop()
    with FeedbackStore(database_url, migrate=False) as store:
        events = [store.get(i).event for i in range(1, store.last_feedback_id() + 1)]
        summary = sorted((e.prompt, e.kind, e.criterion) for e in events)
        pairs = sorted((p.prompt, p.criterion, p.chosen) for p in store.export_pairs())
        stats = store.stats()
    assert summary == [
        (tasks[0]["prompt"], "comparison", "helpfulness"),
        (tasks[0]["prompt"], "comparison", "safety"),
        (tasks[1]["prompt"], "comparison", "helpfulness"),
        (TASKS[RANKED]["prompt"], "ranking", "overall"),
    ]
    assert pairs[:3] == [
        (tasks[0]["prompt"], "helpfulness", "Use a whetstone."),
        (tasks[0]["prompt"], "safety", "Don't."),
        (tasks[1]["prompt"], "helpfulness", "No."),
    ]
    assert stats.agreement.contradicted_groups == 0  # A for helpfulness, B for safety
    keys = sorted(e.idempotency_key for e in events if e.prompt == tasks[0]["prompt"])
    assert re.fullmatch(rf"t{ids[0]}\.comparison-helpfulness\.[0-9a-f]{{32}}", keys[0])
    assert re.fullmatch(rf"t{ids[0]}\.comparison-safety\.[0-9a-f]{{32}}", keys[1])
