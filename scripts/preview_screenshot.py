#!/usr/bin/env python3
"""A screenshot of the preview page as a new user sees it after the README's demo command.

Starts the real `cds-service demo` (gunicorn) on a free loopback port, opens the page in Debian's
chromium through Playwright, picks a demo patient, waits for its cards and saves a PNG:

    python scripts/preview_screenshot.py [--patient demo-d01] [--out docs/preview.png] [--width 1280]

`--width 360` shows the narrowest panel (a phone, or an EHR side panel): the card comes first there.

Exit 0 when the cards were shown and saved; 1 when the page did not show them; 2 without chromium.
tests/test_preview_browser.py runs it, so the README's picture cannot silently go stale.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(url: str, demo: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if demo.poll() is not None:
            raise SystemExit(f"cds-service demo exited with {demo.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"cds-service demo did not answer {url} within {seconds:.0f} s")


def screenshot(patient: str, out: Path, width: int = 1280) -> int:
    from playwright.sync_api import sync_playwright

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        # Its own store and quiet logs; otherwise exactly the README's command.
        env = {
            **os.environ,
            "CDS_DATABASE_URL": f"sqlite:///{Path(tmp) / 'demo.db'}",
            "CDS_LOG_LEVEL": "WARNING",
        }
        demo = subprocess.Popen(
            [sys.executable, "-m", "cds_service.cli.main", "demo", "--port", str(port)],
            env=env,
            cwd=tmp,
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait_until_up(base + "/healthz", demo)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.goto(base + "/")
                page.click(f"button.patient[value='{patient}']")
                page.wait_for_selector(".call-line", timeout=20_000)
                status = page.locator(".http-status").text_content()
                cards = page.locator("article.card").count()
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), full_page=True)
                browser.close()
        finally:
            demo.terminate()  # gunicorn's graceful stop
            try:
                demo.wait(timeout=30)
            except subprocess.TimeoutExpired:
                demo.kill()
                demo.wait()
    if status != "200" or cards == 0:
        print(f"the page showed HTTP {status} and {cards} card(s) for {patient}", file=sys.stderr)
        return 1
    print(f"{out}: {cards} card(s) for {patient}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default="demo-d01")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "preview.png")
    parser.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is absent: bash scripts/install-test-deps.sh", file=sys.stderr)
        return 2
    return screenshot(args.patient, args.out, args.width)


if __name__ == "__main__":
    sys.exit(main())
