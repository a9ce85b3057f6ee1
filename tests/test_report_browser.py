"""The landmark quality report, read the way people read it: in Debian's chromium (driven by
Playwright, no browser download). Hostile names from the data show as text, never as markup."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from pipeline.build import build
from pipeline.catalog import load_catalog, store_of
from pipeline.report import render_report, write_report
from pipeline.store.manifest import Manifest
from tests.conftest import DATA, WILD, copy_images, write_catalog

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCRIPT_NAME = "<script>alert(1)</script>.jpg"  # a tar member may be called this ('/' is a folder in it)
IMG_NAME = "<img src=x onerror=alert(2)>.jpg"  # a plain file name can be this (no '/')


@pytest.fixture(scope="module")
def hostile_version(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    wild = copy_images(root / "src/wild", "aflw-wild-crops", WILD[300:308])
    shutil.copy(DATA / "aflw-wild-crops" / WILD[308], wild / IMG_NAME)
    (wild / "<b>corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    tar_path = root / "src/shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        data = (DATA / "aflw-wild-crops" / WILD[309]).read_bytes()
        info = tarfile.TarInfo(SCRIPT_NAME)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dev = copy_images(root / "src/dev", "aflw2000-dev", [p.stem for p in sorted((DATA / "aflw2000-dev").glob("*.jpg"))[:6]],
                      with_mat=True)
    catalog = load_catalog(write_catalog(root / "catalog.yaml", [
        {"name": "wild", "kind": "folder", "path": str(wild), "pre_cropped": True},
        {"name": "shard", "kind": "tar", "path": str(tar_path), "pre_cropped": True},
        {"name": "dev", "kind": "folder", "path": str(dev), "labels": "mat", "split": "eval"},
    ], output_root=str(root / "out")))
    version, _ = build(catalog)
    return catalog, version


def test_names_from_data_are_escaped(hostile_version):
    catalog, version = hostile_version
    html = render_report(store_of(catalog), version)
    for raw in (SCRIPT_NAME, IMG_NAME, "<b>corrupt.jpg"):
        assert raw not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in html
    assert "&lt;b&gt;corrupt.jpg" in html  # in the quarantine list


def test_report_in_chromium(hostile_version, tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: .ci/setup installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    catalog, version = hostile_version
    store = store_of(catalog)
    path = write_report(store, version, tmp_path / "report")
    counts = Manifest.read(store, version).counts
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(path.as_uri())
        funnel = dict(row.locator("td").all_inner_texts() for row in page.locator("#funnel-table tr").all()
                      if row.locator("td").count() == 2)
        assert int(funnel["images seen"]) == counts.images_seen == 17
        assert int(funnel["quarantined"]) == counts.images_quarantined == 1
        assert int(funnel["faces found"]) == counts.faces
        assert int(funnel["faces kept"]) == counts.faces_kept
        assert json.loads(page.locator("#counts").inner_text())["faces"] == counts.faces
        assert page.get_by_text(SCRIPT_NAME).count() >= 1  # shown as text
        # one CED curve per row of the NME table: the label and every candidate (teacher, its flip, the others)
        n_rows = page.locator("#nme-table tr").count() - 1
        assert page.locator("#nme-table").count() == 1 and n_rows >= 3
        assert page.locator("#ced polyline").count() == n_rows
        # Open a gallery image: the lightbox shows it large, with its caption.
        lightbox = page.locator("#lightbox")
        assert not lightbox.is_visible()
        first = page.locator("img.face").first
        first.scroll_into_view_if_needed()
        first.click()
        lightbox.wait_for(state="visible")
        assert "weight" in lightbox.locator("p").inner_text()
        shot = tmp_path / "report-lightbox.png"
        page.screenshot(path=str(shot))
        keep = Path(__file__).resolve().parent.parent / "out" / "screenshots"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / shot.name)  # for a person to look at after the run
        browser.close()
    assert shot.stat().st_size > 10_000
    assert dialogs == []  # no injected script ran
