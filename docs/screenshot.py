"""Take docs/labelling.png: the labelling page on real HH-RLHF prompts, in headless Chromium.

Run ``.venv/bin/python docs/screenshot.py [OUT.png]`` (``make screenshot``). It starts a feedback
service on a temporary SQLite database, queues a few HH harmless pairs as tasks, opens the page
as annotator "alice", picks a response and types a comment, and saves the screenshot.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plaudit.services.common.textfmt import split_hh_dialogue  # noqa: E402
from plaudit.services.feedback.server import FeedbackServer  # noqa: E402
from plaudit.services.feedback.settings import FeedbackSettings  # noqa: E402

HH_PAIRS = REPO / "plaudit" / "data" / "hh-harmless" / "pairs.jsonl"
CHROMIUM = os.environ.get("PLAUDIT_CHROMIUM", "/usr/bin/chromium")


def hh_tasks(count: int, max_chars: int = 700) -> list[dict[str, Any]]:
    """The first ``count`` short HH pairs as tasks (prompt, two completions)."""
    tasks: list[dict[str, Any]] = []
    with HH_PAIRS.open() as lines:
        for line in lines:
            pair = json.loads(line)
            prompt, chosen, rejected = split_hh_dialogue(pair["chosen"], pair["rejected"])
            if not chosen.strip() or not rejected.strip() or chosen.strip() == rejected.strip():
                continue
            if len(prompt) + len(chosen) + len(rejected) > max_chars or prompt.count("Human:") < 2:
                continue
            tasks.append({"prompt": prompt, "completions": [rejected, chosen]})
            if len(tasks) == count:
                break
    return tasks


def main(out: Path) -> None:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        settings = FeedbackSettings(
            database_url=f"sqlite:///{tmp}/feedback.db",
            host="127.0.0.1",
            port=0,
            metrics_port=0,
            http_port=0,
            log_level="WARNING",
            auth_disabled=True,  # a throwaway local server for the screenshot
        )

        async def start() -> FeedbackServer:
            server = FeedbackServer(settings)
            await server.start()
            await server.wait_until_serving(30)
            return server

        server = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
        base = f"http://127.0.0.1:{server.http_port}/"
        try:
            body = json.dumps({"tasks": hh_tasks(6)}).encode()
            request = urllib.request.Request(
                base + "api/v1/tasks", data=body, headers={"Content-Type": "application/json"}
            )
            urllib.request.urlopen(request, timeout=30).close()
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM)
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.add_init_script(
                    "localStorage.setItem('plaudit.annotator', 'alice');"
                    "sessionStorage.setItem('plaudit.session', "
                    "JSON.stringify({labelled: 23, skipped: 2}));"
                )
                page.goto(base)
                page.wait_for_selector(".completion")
                page.keyboard.press("2")
                page.fill(
                    "#comment",
                    "B stays calm and offers to talk it through; A threatens to malfunction.",
                )
                page.locator("body").click(position={"x": 5, "y": 200})
                page.screenshot(path=str(out), full_page=True)
                browser.close()
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(grace=1), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "labelling.png")
