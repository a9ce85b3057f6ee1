"""`facecurate browse` used the way people use it: the served app in Debian's chromium (driven by
Playwright, no browser download). Two filters and a sort through the form, the faces shown checked
against pandas on the same Parquet files, the view reopened from its URL, a face page opened and a
candidate label toggled; hostile names never run as script."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlparse

import pytest

from pipeline.browse.app import bind, create_app
from pipeline.browse.queries import View
from tests.browse_fixture import default_sort, expected, faces_frame

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def served(browse_version):
    """(base url, store, version): the app under uvicorn on a free port of 127.0.0.1, as `browse` runs it."""
    import uvicorn

    store, version = browse_version
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(store, version), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", store, version
    server.should_exit = True
    thread.join(10)
    sock.close()


def shown(page) -> list[str]:
    return [a.get_attribute("data-face-id") for a in page.locator("a.face").all()]


def test_browse_in_chromium(served, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: .ci/setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    base, store, version = served
    frame = faces_frame(store, version)
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(base + "/")
        # The default view: everything, worst first.
        assert shown(page) == expected(frame, View()).face_id.head(48).tolist()
        assert page.locator("#sorted-by").inner_text() == default_sort(frame)

        # Two filters and a sort, through the form.
        page.select_option("#f-source", ["wild", "shard"])
        page.select_option("#f-status", "kept")
        page.select_option("#f-sort", "det_score")
        page.select_option("#f-order", "asc")
        with page.expect_navigation():
            page.click("#apply")
        view = View(source=("shard", "wild"), status="kept", sort="det_score", order="asc")
        want = expected(frame, view)
        assert 0 < len(want) < len(frame)
        assert shown(page) == want.face_id.head(48).tolist()
        assert int(page.locator("#total").inner_text()) == len(want)
        grid_shot = tmp_path / "browse-grid.png"
        page.screenshot(path=str(grid_shot))

        # The URL holds the view: reopened in a fresh page, the same faces.
        url = page.url
        assert View.from_params(parse_qsl(urlparse(url).query)) == view
        assert "min_" not in url and "max_" not in url  # empty fields stay out of a shared URL
        again = browser.new_page()
        again.goto(url)
        assert shown(again) == shown(page)
        again.close()

        # A face page: the whole image, its box, every candidate; toggle one off and on.
        first = page.locator("a.face").first
        face_id = first.get_attribute("data-face-id")
        with page.expect_navigation():
            first.click()
        assert page.locator("h1").inner_text() == face_id
        assert page.locator("#whole image").count() == 1 and page.locator("#box").count() == 1
        toggles = page.locator("input.cand-toggle")
        row = frame.set_index("face_id").loc[face_id]
        assert toggles.count() == 1 + len(row.alt_landmarks) + (row.ref_landmarks is not None)
        target = toggles.nth(1).get_attribute("data-target")
        label = page.locator(f"#{target}")
        assert label.is_visible()
        toggles.nth(1).uncheck()
        assert label.evaluate("el => getComputedStyle(el).display") == "none"
        assert page.locator("#cand-0").is_visible()  # the others stay
        toggles.nth(1).check()
        assert label.evaluate("el => getComputedStyle(el).display") != "none"
        shot = tmp_path / "browse-face.png"
        page.screenshot(path=str(shot), full_page=True)

        # Back to the same view.
        with page.expect_navigation():
            page.click("#back")
        assert shown(page) == want.face_id.head(48).tolist()
        # The hostile tar member's face: its name is text, never markup.
        tar_face = frame[frame.source == "shard"].face_id.iloc[0]
        page.goto(f"{base}/face/{tar_face}")
        assert "<script>alert(1)</script>.jpg" in page.locator("#uri").inner_text()
        keep = Path(__file__).resolve().parent.parent / "out" / "screenshots"
        keep.mkdir(parents=True, exist_ok=True)
        for path in (grid_shot, shot):
            shutil.copy(path, keep / path.name)  # for a person to look at after the run
        browser.close()
    assert shot.stat().st_size > 10_000
    assert dialogs == []  # no injected script ran
