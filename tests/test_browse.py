"""`facecurate browse`: the view query against pandas on the same Parquet files, paging, the app's
pages (escaping, path safety, missing images, unreadable shards) and the served port."""

from __future__ import annotations

import html
import re
import shutil
import socket
from urllib.parse import parse_qsl, urlencode

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from pipeline.browse.app import PortTaken, bind, create_app
from pipeline.browse.queries import BadView, VersionFaces, View
from pipeline.store.files import read_table_file
from pipeline.store.layout import Store
from pipeline.store.manifest import Manifest
from tests.browse_fixture import (
    GONE,
    IMG_NAME,
    SCRIPT_NAME,
    default_sort,
    expected,
    faces_frame,
)


@pytest.fixture(scope="module")
def version(browse_version):
    return browse_version


@pytest.fixture(scope="module")
def frame(version):
    return faces_frame(*version)


@pytest.fixture(scope="module")
def client(version):
    return TestClient(create_app(*version))


VIEWS = [
    View(),
    View(source=("wild",), status="kept", sort="det_score", order="asc"),
    View(status="dropped", reason=("flip_nme_pct",), sort="weight"),
    View(yaw=("0-30",), ranges=(("flip_nme_pct", 1.0, 1.5),), sort="abs_yaw_deg", order="desc"),
    View(split=("eval", "train"), source=("dev", "scenes"), ranges=(("face_px", 50.0, None),),
         sort="face_px"),
    View(source=("nowhere",)),
]


@pytest.mark.parametrize("view", VIEWS, ids=range(len(VIEWS)))
def test_views_match_pandas(version, frame, view):
    faces = VersionFaces(*version)
    page = faces.page(view)
    assert faces.default_sort == default_sort(frame)
    want = expected(frame, view)
    assert page.total == len(want) and (len(want) > 0 or view.source == ("nowhere",))
    assert [r["face_id"] for r in page.rows] == want.face_id.head(view.per_page).tolist()
    for row in page.rows:  # the card columns come from the row's own shard
        stored = frame.set_index("face_id").loc[row["face_id"]]
        assert row["crop"] == stored.crop and np.allclose(row["landmarks"], stored.landmarks)


def test_fixture_has_both_decisions(frame):
    assert frame.keep.any() and (~frame.keep).any()  # the status / reason views above are not vacuous
    assert "flip_nme_pct" in set(frame.reject_reason.dropna().str.split(" ").str[0])
    assert frame.ref_landmarks.notna().any() and frame.source.nunique() == 4


def test_paging_covers_every_face_once(version, frame):
    faces = VersionFaces(*version)
    view = View(sort="weight", order="asc", per_page=5)
    first = faces.page(view)
    seen = []
    for n in range(1, first.pages + 1):
        seen += [r["face_id"] for r in faces.page(View(sort="weight", order="asc", per_page=5, page=n)).rows]
    assert seen == expected(frame, view).face_id.tolist() and len(set(seen)) == len(frame)
    past = faces.page(View(sort="weight", order="asc", per_page=5, page=first.pages + 3))  # the last page
    assert past.view.page == first.pages and [r["face_id"] for r in past.rows] == seen[(first.pages - 1) * 5:]


def test_view_round_trips_through_the_url():
    view = View(source=("a", "b&c"), status="kept", reason=("flip_nme_pct",), yaw=("30-60",),
                ranges=(("blur", 0.5, None), ("flip_nme_pct", None, 3.0)), sort="blur", order="asc", page=4)
    assert View.from_params(parse_qsl(urlencode(view.to_params()))) == view
    for bad in ({"status": ["maybe"]}, {"min_blur": ["x"]}, {"yaw": ["0-45"]}, {"page": ["nan"]}):
        with pytest.raises(BadView):
            View.from_params(bad)


def test_new_float_columns_are_features(tmp_path, version):
    """Columns another change adds are filterable and sortable without a change here, even where
    only some shards have them (a parent's linked shards predate the column); `verifier_nme_pct`
    becomes the worst-first default."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store, v = version
    root = tmp_path / "out"
    shutil.copytree(store.dir, root / store.dataset)
    copy = Store(str(root), store.dataset)
    path = f"{copy.version_dir(v)}/{Manifest.read(copy, v).shards[0].file}"
    table = read_table_file(copy.fs, path)
    scores = pa.array(np.linspace(1, 9, table.num_rows).astype(np.float32))
    for name in ("new_score_pct", "verifier_nme_pct"):  # the verifier's may already be there: replaced
        at = table.schema.get_field_index(name)
        table = table.set_column(at, name, scores) if at >= 0 else table.append_column(name, scores)
    pq.write_table(table, path)  # only this shard has new_score_pct
    faces = VersionFaces(copy, v)
    assert faces.default_sort == "verifier_nme_pct" and "new_score_pct" in faces.float_columns
    frame = faces_frame(copy, v)
    for view in (View(ranges=(("new_score_pct", 2.0, None),)), View(sort="new_score_pct", order="desc"),
                 View(ranges=(("verifier_nme_pct", None, 5.0),), sort="face_px")):
        page = faces.page(view)
        want = expected(frame, view)
        assert page.total == len(want) > 0
        assert [r["face_id"] for r in page.rows] == want.face_id.head(view.per_page).tolist()


# ----------------------------------------------------------------------------------------- the app


def face_ids(html: str) -> list[str]:
    return re.findall(r'data-face-id="([^"]+)"', html)


def test_grid_shows_the_view_from_the_url(client, version, frame):
    view = View(source=("wild",), status="kept", sort="det_score", order="asc", per_page=2, page=2)
    r = client.get("/?" + urlencode(view.to_params()))
    assert r.status_code == 200
    want = expected(frame, view)
    assert len(want) > 2 and face_ids(r.text) == want.face_id.iloc[2:4].tolist()
    assert f'<span id="total">{len(want)}</span>' in r.text
    # The pager keeps the filters and moves the page.
    prev = re.search(r'id="prev" href="([^"]+)"', r.text).group(1).replace("&amp;", "&")
    assert View.from_params(parse_qsl(prev.split("?", 1)[1])) == View(**{**view.__dict__, "page": 1})
    # The form shows the view's bounds exactly, so applying it again keeps the view.
    r = client.get("/?min_blur=12.345678901&max_flip_nme_pct=2")
    assert 'id="min-blur" value="12.345678901"' in r.text and 'id="max-flip_nme_pct" value="2"' in r.text


def test_a_page_past_the_end_shows_the_last_page(client, frame):
    """Any page number past the end, however large (beyond what the query's OFFSET holds), shows the
    last page; a negative one the first; one that is not a number is a bad view."""
    view = View(sort="weight", order="asc", per_page=5)
    want = expected(frame, view).face_id.tolist()
    last = (len(want) - 1) // 5 + 1
    for page in (str(last + 1), "999999999999999999999", "1e300"):
        r = client.get("/?" + urlencode([*view.to_params(), ("page", page)]))
        assert r.status_code == 200, (page, r.status_code)
        assert face_ids(r.text) == want[(last - 1) * 5:], page
        assert f'<span id="page-no">{last}</span>' in r.text and 'id="next"' not in r.text
    r = client.get("/?" + urlencode([*view.to_params(), ("page", "-3")]))
    assert r.status_code == 200 and face_ids(r.text) == want[:5]
    assert client.get("/?page=last").status_code == 400


def test_face_page_shows_every_candidate_and_the_rule(client, frame):
    with_ref = frame[frame.ref_landmarks.notna()]
    row = with_ref.sort_values("keep").iloc[0]  # a dropped one where there is one
    r = client.get(f"/face/{row.face_id}?status=kept")
    assert r.status_code == 200
    names = re.findall(r'class="pts cand" id="cand-\d+" data-name="([^"]+)"', r.text)
    assert names == [f"{row.landmarker} (label)", *[a["name"] for a in row.alt_landmarks], "reference"]
    assert 'id="image-unavailable"' not in r.text and "data:image/jpeg;base64," in r.text
    assert f'<b id="weight">{row.weight:.4g}</b>' in r.text
    if isinstance(row.reject_reason, str):
        assert f'id="reject-reason">{html.escape(row.reject_reason)}<' in r.text
    for feature in ("flip_nme_pct", "agreement_nme_pct", "face_px", "landmark_score"):
        assert f"<td>{feature}</td>" in r.text
    assert 'id="back" href="/?status=kept"' in r.text


def test_missing_image_is_shown_not_fatal(client, frame):
    row = frame[frame.uri.str.endswith(GONE)].iloc[0]
    r = client.get(f"/face/{row.face_id}")
    assert r.status_code == 200 and 'id="image-unavailable"' in r.text and "missing" in r.text


def test_names_from_data_are_escaped(client, frame):
    tar_face = frame[frame.uri.str.contains("alert(1)", regex=False)].iloc[0]
    r = client.get(f"/face/{tar_face.face_id}")
    assert r.status_code == 200
    assert SCRIPT_NAME not in r.text and "&lt;script&gt;alert(1)&lt;/script&gt;.jpg" in r.text
    assert 'id="image-unavailable"' not in r.text  # the tar member is read through the tar
    img_face = frame[frame.uri.str.contains("onerror", regex=False)].iloc[0]
    r = client.get(f"/face/{img_face.face_id}")
    assert IMG_NAME not in r.text and "&lt;img src=x onerror=alert(2)&gt;.jpg" in r.text
    r = client.get("/?sort=<script>alert(3)</script>")  # a bad parameter is echoed escaped
    assert r.status_code == 400 and "<script>alert(3)" not in r.text and "&lt;script&gt;alert(3)" in r.text
    r = client.get("/?source=<script>alert(4)</script>")
    assert r.status_code == 200 and "<script>alert(4)" not in r.text


def test_no_request_reaches_the_filesystem(client, version):
    store, _ = version
    paths = ["/face/..%2F..%2F..%2Fetc%2Fpasswd", "/face/../../etc/passwd", "/../../etc/passwd",
             "/face/%2Fetc%2Fpasswd", "/static/../../etc/passwd", "/docs", "/openapi.json",
             f"/face/{store.dir}/v0001/manifest.json", "/face/file:%2F%2F%2Fetc%2Fpasswd"]
    for path in paths:
        r = client.get(path)
        assert r.status_code in (400, 404), path
        assert "root:x:0:0" not in r.text and '"shards"' not in r.text, path
    assert client.get("/?sort=../../etc/passwd").status_code == 400
    assert client.get("/?min_..%2Fetc=1").status_code == 400
    assert client.post("/").status_code == 405
    routes = {(tuple(sorted(r.methods)), r.path) for r in client.app.routes if hasattr(r, "methods")}
    assert routes == {(("GET",), "/"), (("GET",), "/face/{face_id}")}


def test_unreadable_shard_is_reported_and_the_rest_served(tmp_path, version, frame):
    store, v = version
    root = tmp_path / "out"
    shutil.copytree(store.dir, root / store.dataset)
    copy = Store(str(root), store.dataset)
    entries = Manifest.read(copy, v).shards
    bad, later = entries[0], entries[1]
    bad_ids = pd.read_parquet(f"{copy.version_dir(v)}/{bad.file}").face_id.tolist()
    with open(f"{copy.version_dir(v)}/{bad.file}", "r+b") as f:  # garble its footer
        f.seek(-64, 2)
        f.write(b"\0" * 64)
    client = TestClient(create_app(copy, v))
    r = client.get("/?per_page=200")
    assert r.status_code == 200
    assert re.search(rf'class="warn unavailable">unavailable: {bad.rows} faces in {bad.file}', r.text)
    shown = face_ids(r.text)
    assert sorted(shown) == sorted(set(frame.face_id) - set(bad_ids))
    assert client.get(f"/face/{bad_ids[0]}").status_code == 404
    # A shard that disappears while serving: its faces' crops are unavailable, the page still answers.
    later_ids = pd.read_parquet(f"{copy.version_dir(v)}/{later.file}").face_id.tolist()
    (root / store.dataset / f"v{v:04d}" / later.file).unlink()
    r = client.get("/?per_page=200")
    assert r.status_code == 200 and r.text.count("crop unavailable") == len(later_ids)
    r = client.get(f"/face/{later_ids[0]}")
    assert r.status_code == 503 and later.file in r.text


def test_taken_port_is_one_clear_error(version, tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        with pytest.raises(PortTaken, match=f"127.0.0.1:{port}.*--port"):
            bind("127.0.0.1", port)
        from flows.cli import main
        from tests.conftest import write_catalog

        store, v = version
        sources = [{"name": "x", "kind": "folder", "path": str(tmp_path)}]
        catalog = write_catalog(tmp_path / "catalog.yaml", sources, output_root=store.root)
        assert main(["browse", "--catalog", str(catalog), f"faces@v{v}", "--port", str(port)]) == 2
    finally:
        holder.close()


def test_images_come_only_from_the_rows_uri(tmp_path):
    from pipeline.browse.images import ImageUnavailable, points_path, read_image

    with pytest.raises(ImageUnavailable, match="remote"):  # a local viewer fetches nothing
        read_image("http://example.com/a.jpg")
    (tmp_path / "notes.txt").write_text("root:x:0:0")
    with pytest.raises(ImageUnavailable, match="not an image"):  # a uri to a non-image serves nothing
        read_image(str(tmp_path / "notes.txt"))
    with pytest.raises(ImageUnavailable, match="missing"):
        read_image(str(tmp_path / "gone.jpg"))
    # Points are drawn through the crop's affine: x' = 2x + 1, y' = 3y - 1.
    assert points_path([1, 2, float("nan"), 0], [2, 0, 1, 0, 3, -1]) == "M3.0 5.0h0"
