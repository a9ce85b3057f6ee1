"""Sources: folder listing, tar shards (hostile members too), and HTTP URL lists against a local server."""

from __future__ import annotations

import io
import tarfile
import time

import pytest

from pipeline.catalog import FolderSource, TarSource, UrlListSource
from pipeline.sources import FetchError, TarReader, fetch_url, list_items, read_file
from tests.badfiles import face_jpeg
from tests.http_server import LocalServer


def test_folder_listing_is_recursive_filtered_and_sorted(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ["a/b/x.JPG", "a/y.png", "z.jpg", "notes.txt", "a/b/w.mat"]:
        (tmp_path / name).write_bytes(b"data")
    items = list(list_items(FolderSource(name="f", kind="folder", path=str(tmp_path))))
    assert [i.uri.removeprefix(str(tmp_path)) for i in items] == ["/a/b/x.JPG", "/a/y.png", "/z.jpg"]
    assert all(i.size == 4 and i.mtime for i in items)
    assert read_file(items[0], max_bytes=10) == b"data"
    with pytest.raises(FetchError, match="too large"):
        read_file(items[0], max_bytes=3)


def test_folder_listing_follows_symbolic_links(tmp_path):
    """Links to files are listed (with their target's size), links to folders are walked, a link
    loop ends, and a dangling link is listed so that reading it fails with its reason."""
    store = tmp_path / "store"
    (store / "deep").mkdir(parents=True)
    (store / "a.jpg").write_bytes(b"aaaa")
    (store / "deep" / "b.jpg").write_bytes(b"bbbbbb")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "link.jpg").symlink_to(store / "a.jpg")
    (src / "rel.jpg").symlink_to("../store/deep/b.jpg")
    (src / "dir").symlink_to(store / "deep")
    (src / "sub" / "loop").symlink_to("..")  # src/sub/loop/sub/loop/... must not recurse forever
    (src / "dangling.jpg").symlink_to(store / "gone.jpg")
    items = list(list_items(FolderSource(name="f", kind="folder", path=str(src))))
    by_name = {i.uri.removeprefix(str(src)): i for i in items}
    assert sorted(by_name) == ["/dangling.jpg", "/dir/b.jpg", "/link.jpg", "/rel.jpg"]
    assert by_name["/link.jpg"].size == 4 and by_name["/rel.jpg"].size == 6 and by_name["/dir/b.jpg"].size == 6
    assert read_file(by_name["/link.jpg"], max_bytes=100) == b"aaaa"
    assert read_file(by_name["/dir/b.jpg"], max_bytes=100) == b"bbbbbb"
    with pytest.raises(FetchError) as err:
        read_file(by_name["/dangling.jpg"], max_bytes=100)
    assert err.value.reason == "broken symbolic link" and err.value.detail.endswith(f"-> {store / 'gone.jpg'}")


def _tar_with(path, members: list[tuple[tarfile.TarInfo, bytes | None]]):
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def test_tar_members_are_read_and_hostile_ones_refused(tmp_path):
    good = face_jpeg()

    def file(name, data=good):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        return info, data

    def special(name, kind, target=""):
        info = tarfile.TarInfo(name)
        info.type = kind
        info.linkname = target
        return info, None

    _tar_with(tmp_path / "s.tar", [
        file("faces/ok.jpg"),
        file("../../escape.jpg"),
        file("/abs/path.jpg"),
        special("link.jpg", tarfile.SYMTYPE, "/etc/passwd"),
        special("hard.jpg", tarfile.LNKTYPE, "faces/ok.jpg"),
        special("dev.jpg", tarfile.CHRTYPE),
        special("fifo.jpg", tarfile.FIFOTYPE),
        file("big.jpg", b"\0" * 5000),
    ])
    source = TarSource(name="t", kind="tar", path=str(tmp_path / "*.tar"), max_bytes=10**6)
    items = {i.uri.split("#", 1)[1]: i for i in list_items(source)}
    assert set(items) == {"faces/ok.jpg", "../../escape.jpg", "/abs/path.jpg", "link.jpg", "hard.jpg", "dev.jpg",
                          "fifo.jpg", "big.jpg"}
    reader = TarReader()
    assert reader.read(items["faces/ok.jpg"], 10**6) == good
    expected = {"../../escape.jpg": "unsafe tar path", "/abs/path.jpg": "unsafe tar path",
                "link.jpg": "tar link member", "hard.jpg": "tar link member",
                "dev.jpg": "tar special member", "fifo.jpg": "tar special member"}
    for name, reason in expected.items():
        with pytest.raises(FetchError) as err:
            reader.read(items[name], 10**6)
        assert err.value.reason == reason, name
    with pytest.raises(FetchError, match="too large"):
        reader.read(items["big.jpg"], 4096)
    reader.close()
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path.parent / "escape.jpg").exists()


def test_url_list_skips_comments_and_repeats(tmp_path):
    (tmp_path / "urls.txt").write_text("# header\nhttp://h/a.jpg\n\nhttp://h/b.jpg  # note\nhttp://h/a.jpg\n")
    items = list(list_items(UrlListSource(name="u", kind="urls", path=str(tmp_path / "urls.txt"))))
    assert [i.uri for i in items] == ["http://h/a.jpg", "http://h/b.jpg"]


@pytest.fixture(scope="module")
def server():
    with LocalServer(face_jpeg()) as srv:
        yield srv


def _fetch(server, path, **kw):
    args = dict(timeout_s=1.0, retries=3, backoff_s=0.01, max_bytes=2_000_000) | kw
    return fetch_url(server.url + path, **args)


def test_http_success_and_retries(server):
    assert _fetch(server, "/ok/a.jpg") == face_jpeg()
    assert _fetch(server, "/flaky") == face_jpeg()  # two 503s, then served
    started = time.monotonic()
    assert _fetch(server, "/429") == face_jpeg()  # waits for Retry-After: 1
    assert time.monotonic() - started >= 0.9


@pytest.mark.parametrize("path, reason", [
    ("/404", "HTTP 404"),
    ("/500", "fetch failed"),
    ("/loop", "redirect loop"),
    ("/huge", "too large"),
    ("/huge-chunked", "too large"),
    ("/truncated", "fetch failed"),
    ("/reset", "fetch failed"),
    ("/slow", None),  # a timeout or the overall deadline, either way bounded
])
def test_http_faults_end_in_a_reason_without_hanging(server, path, reason):
    started = time.monotonic()
    with pytest.raises(FetchError) as err:
        _fetch(server, path, retries=1)
    assert time.monotonic() - started < 10
    if reason:
        assert err.value.reason == reason


def test_not_a_url_is_refused():
    with pytest.raises(FetchError, match="bad url"):
        fetch_url("ftp://x/y.jpg", timeout_s=1, retries=0, backoff_s=0, max_bytes=10)
