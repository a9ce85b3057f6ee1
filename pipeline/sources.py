"""List the images a catalog source offers and read their bytes: folders, URL lists, tar shards.

Listing is cheap (names, sizes, mtimes) so a rerun can skip unchanged items without reading them;
reading returns bytes or raises FetchError, whose reason becomes a quarantine row.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import random
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import requests

from pipeline.catalog import FolderSource, TarSource, UrlListSource

log = logging.getLogger(__name__)
USER_AGENT = "facecurate/0.1 (+dataset curation; respects Retry-After)"
MAX_RETRY_AFTER_S = 30.0
MAX_REDIRECTS = 5


class FetchError(IOError):
    """An item whose bytes could not be had; `reason` is short and stable."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class SourceItem:
    source: str  # catalog source name
    uri: str  # where the bytes live; tar members are "<tar uri>#<member name>"
    size: int | None  # bytes, when listing knows it
    mtime: str | None  # listing's modification stamp: with uri and size, the "unchanged" key

    @property
    def stat_key(self) -> str:
        return f"{self.uri}|{self.size}|{self.mtime}"


def _matches(name: str, include: tuple[str, ...]) -> bool:
    base = name.rsplit("/", 1)[-1].lower()
    return any(fnmatch.fnmatch(base, pattern.lower()) for pattern in include)


def _mtime(info: dict) -> str | None:
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if key in info and info[key] is not None:
            return str(info[key])
    return None


def _walk_local(root: str) -> Iterator[tuple[str, os.stat_result, str | None]]:
    """Every file under a local `root`, following symbolic links (fsspec's local `find` reports
    links as type "other" and would list nothing behind them): (path, stat of the file, None), or
    (path, the link's own lstat, its target) for a dangling link. A directory reached twice - a
    link loop, or a link to a folder already walked - is walked once, by its real path when it has one."""
    seen: set[tuple[int, int]] = set()
    real, linked = [root], []
    while real or linked:
        folder = real.pop() if real else linked.pop(0)
        try:
            st = os.stat(folder)
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            log.warning("%s: cannot list (%s); skipped", folder, err)
            continue
        if (st.st_dev, st.st_ino) in seen:
            log.info("%s: a folder already listed (a symbolic link loop or a second link); skipped", folder)
            continue
        seen.add((st.st_dev, st.st_ino))
        for entry in entries:
            try:
                link = entry.is_symlink()
                if entry.is_dir(follow_symlinks=True):
                    (linked if link else real).append(entry.path)
                elif entry.is_file(follow_symlinks=True):
                    yield entry.path, entry.stat(follow_symlinks=True), None
                elif link and not os.path.exists(entry.path):
                    yield entry.path, entry.stat(follow_symlinks=False), os.readlink(entry.path)
            except OSError as err:  # e.g. no permission to look behind a link
                log.warning("%s: cannot stat (%s); skipped", entry.path, err)


def _list_local(source: FolderSource, root: str) -> Iterator[SourceItem]:
    found = []
    for path, st, dangling in _walk_local(root):
        if _matches(path, source.include):
            size = None if dangling is not None else st.st_size  # a dangling link is read, and fails, with its reason
            found.append(SourceItem(source.name, path, size, str(st.st_mtime)))  # the stamp fsspec's info gives
    yield from sorted(found, key=lambda item: item.uri)


def list_folder(source: FolderSource) -> Iterator[SourceItem]:
    fs, root = fsspec.core.url_to_fs(source.path)
    if not fs.exists(root):
        raise FileNotFoundError(f"source {source.name!r}: folder not found: {source.path}")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        yield from _list_local(source, root)
        return
    for path, info in sorted(fs.find(root, detail=True).items()):
        if info.get("type") != "file" or not _matches(path, source.include):
            continue
        uri = path if protocol in ("file", "local") else f"{protocol}://{path}"
        yield SourceItem(source.name, uri, info.get("size"), _mtime(info))


def list_urls(source: UrlListSource) -> Iterator[SourceItem]:
    with fsspec.open(source.path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    seen: set[str] = set()
    for line in lines:
        url = line.split("#", 1)[0].strip()
        if not url or url in seen:
            continue
        seen.add(url)
        # A URL is taken as immutable: once fetched, a rerun does not fetch it again.
        yield SourceItem(source.name, url, None, None)


def _tar_paths(source: TarSource) -> list[str]:
    fs, root = fsspec.core.url_to_fs(source.path)
    if fs.isdir(root):
        paths = [p for p in fs.find(root) if p.endswith((".tar", ".tar.gz", ".tgz"))]
    else:
        paths = fs.glob(root) if any(c in root for c in "*?[") else [root]
    if not paths:
        raise FileNotFoundError(f"source {source.name!r}: no tar files at {source.path}")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return sorted(p if protocol in ("file", "local") else f"{protocol}://{p}" for p in paths)


def list_tar(source: TarSource) -> Iterator[SourceItem]:
    for tar_uri in _tar_paths(source):
        fs, path = fsspec.core.url_to_fs(tar_uri)
        stamp = _mtime(fs.info(path))
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar:
                # Every file-like member is listed, unsafe ones too: reading refuses them with a reason,
                # so they show up in quarantine instead of vanishing silently.
                if member.isdir() or not _matches(member.name, source.include):
                    continue
                yield SourceItem(source.name, f"{tar_uri}#{member.name}", member.size, stamp)


def list_items(source) -> Iterator[SourceItem]:
    if isinstance(source, FolderSource):
        return list_folder(source)
    if isinstance(source, UrlListSource):
        return list_urls(source)
    if isinstance(source, TarSource):
        return list_tar(source)
    raise TypeError(f"unknown source kind: {type(source).__name__}")


# ---------------------------------------------------------------------------------------- reading


def read_file(item: SourceItem, max_bytes: int) -> bytes:
    if item.size is not None and item.size > max_bytes:
        raise FetchError("too large", f"{item.size} bytes > cap {max_bytes}")
    try:
        with fsspec.open(item.uri, "rb") as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError) as err:
        path = item.uri.removeprefix("file://")
        if "://" not in path and os.path.islink(path) and not os.path.exists(path):  # to nothing, or a loop
            raise FetchError("broken symbolic link", f"{item.uri} -> {os.readlink(path)}") from None
        if isinstance(err, FileNotFoundError):
            raise FetchError("missing", "file disappeared after listing") from None
        raise FetchError("read error", f"{type(err).__name__}: {err}") from None
    if len(data) > max_bytes:
        raise FetchError("too large", f"more than cap {max_bytes} bytes")
    return data


def _unsafe_member_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if member.issym() or member.islnk():
        return "tar link member"
    if member.isdev() or member.isfifo() or not member.isfile():
        return "tar special member"
    if name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
        return "unsafe tar path"
    return None


class TarReader:
    """Reads members of tar shards; keeps each shard open across the items of one batch."""

    def __init__(self) -> None:
        self._open: dict[str, tuple] = {}

    def read(self, item: SourceItem, max_bytes: int) -> bytes:
        tar_uri, member_name = item.uri.split("#", 1)
        if tar_uri not in self._open:
            fs, path = fsspec.core.url_to_fs(tar_uri)
            raw = fs.open(path, "rb")
            tar = tarfile.open(fileobj=raw, mode="r:*")
            self._open[tar_uri] = (raw, tar, {m.name: m for m in tar.getmembers()})
        _, tar, members = self._open[tar_uri]
        member = members.get(member_name)
        if member is None:
            raise FetchError("missing", f"no member {member_name!r} in {tar_uri}")
        reason = _unsafe_member_reason(member)
        if reason:
            raise FetchError(reason, member_name)
        if member.size > max_bytes:
            raise FetchError("too large", f"{member.size} bytes > cap {max_bytes}")
        f = tar.extractfile(member)
        if f is None:
            raise FetchError("tar special member", member_name)
        try:
            data = f.read(max_bytes + 1)
        except (OSError, EOFError, tarfile.TarError) as err:
            raise FetchError("truncated tar", f"{type(err).__name__}: {err}") from None
        if len(data) != member.size:
            raise FetchError("truncated tar", f"read {len(data)} of {member.size} bytes")
        return data

    def close(self) -> None:
        for raw, tar, _ in self._open.values():
            tar.close()
            raw.close()
        self._open.clear()


def _retry_after_s(response: requests.Response, attempt: int, backoff_s: float) -> float:
    header = response.headers.get("Retry-After", "") if response is not None else ""
    if header.strip().isdigit():
        return min(float(header), MAX_RETRY_AFTER_S)
    return min(backoff_s * (2**attempt) * (1 + random.random() * 0.25), MAX_RETRY_AFTER_S)


def fetch_url(url: str, *, timeout_s: float, retries: int, backoff_s: float, max_bytes: int,
              session: requests.Session | None = None) -> bytes:
    """GET `url` with timeouts, bounded retries with backoff (and Retry-After), and a size cap."""
    if not url.lower().startswith(("http://", "https://")):
        raise FetchError("bad url", url[:200])
    session = session or requests.Session()
    session.max_redirects = MAX_REDIRECTS
    deadline = time.monotonic() + timeout_s * (retries + 1) * 2
    last = "no attempt"
    for attempt in range(retries + 1):
        response = None
        try:
            response = session.get(url, stream=True, timeout=(timeout_s, timeout_s),
                                   headers={"User-Agent": USER_AGENT})
            if response.status_code == 429 or response.status_code >= 500:
                last = f"HTTP {response.status_code}"
                raise _Retryable()
            if response.status_code >= 400:
                raise FetchError(f"HTTP {response.status_code}", url[:200])
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError("too large", f"Content-Length {length} > cap {max_bytes}")
            chunks, total = [], 0
            for chunk in response.iter_content(chunk_size=1 << 16):
                total += len(chunk)
                if total > max_bytes:
                    raise FetchError("too large", f"body over cap {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError("timeout", "body too slow")
                chunks.append(chunk)
            if length and length.isdigit() and total < int(length):
                last = f"truncated body ({total} of {length} bytes)"
                raise _Retryable()
            return b"".join(chunks)
        except _Retryable:
            pass
        except requests.TooManyRedirects:
            raise FetchError("redirect loop", url[:200]) from None
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            last = f"{type(err).__name__}"
        finally:
            if response is not None:
                response.close()
        if attempt < retries:
            wait = _retry_after_s(response, attempt, backoff_s)
            if time.monotonic() + wait > deadline:
                break
            time.sleep(wait)
    raise FetchError("fetch failed", f"{last} after {retries + 1} attempts")


class _Retryable(Exception):
    pass
