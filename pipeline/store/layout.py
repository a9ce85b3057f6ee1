"""Where a dataset's files live: versions, staging folders, a trainer round's scores and state; which
versions are committed (those with a manifest) and dataset references (`faces@v3`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import fsspec

MANIFEST = "manifest.json"  # a version's manifest file, written last: its commit point
_VERSION_DIR = re.compile(r"^v(\d{4,})$")
_SCORES_FILE = re.compile(r"^v(\d{4,})-r(\d+)\.parquet$")


@dataclass(frozen=True)
class Store:
    """Where one dataset's versions live."""

    root: str  # output root (path or fsspec URL)
    dataset: str

    def __post_init__(self) -> None:
        if not DATASET_NAME.fullmatch(self.dataset):  # every path is built under <root>/<dataset>
            raise ValueError(f"dataset name {self.dataset!r} would leave the output root")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.root)[0]

    @property
    def dir(self) -> str:
        return fsspec.core.url_to_fs(self.root)[1].rstrip("/") + "/" + self.dataset

    def version_dir(self, version: int) -> str:
        return f"{self.dir}/v{version:04d}"

    def version_dirs(self) -> dict[int, str]:
        """Every version folder, committed or not (a crashed commit has no manifest), by version."""
        fs = self.fs
        if not fs.exists(self.dir):
            return {}
        found = {}
        for path in fs.ls(self.dir, detail=False):
            match = _VERSION_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match:
                found[int(match.group(1))] = path.rstrip("/")
        return dict(sorted(found.items()))

    def staging_dir(self, key: str) -> str:
        return f"{self.dir}/_staging/{key}"

    def staging_dirs(self) -> dict[str, str]:
        """Every build's staging folder, by its key."""
        root = self.staging_dir("").rstrip("/")
        if not self.fs.exists(root):
            return {}
        return {p.rstrip("/").rsplit("/", 1)[-1]: p.rstrip("/") for p in self.fs.ls(root, detail=False)}

    # A trainer round's scores live beside the versions, not inside one (versions are immutable once
    # committed): <dataset>/scores/vNNNN-rNN.parquet. Its training state: <dataset>/rounds/vNNNN/.

    def scores_path(self, version: int, round_index: int) -> str:
        return f"{self.dir}/scores/v{version:04d}-r{round_index:02d}.parquet"

    def list_scores(self, version: int) -> list[str]:
        """The scores files trainer rounds wrote for `version`, by round."""
        folder = f"{self.dir}/scores"
        if not self.fs.exists(folder):
            return []
        found = []
        for path in self.fs.ls(folder, detail=False):
            match = _SCORES_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])
            if match and int(match.group(1)) == version:
                found.append((int(match.group(2)), path))
        return [path for _, path in sorted(found)]

    @staticmethod
    def scores_version(path: str) -> int | None:
        """The version a scores file was written for, from its name (`vNNNN-rNN.parquet`), if it says."""
        match = _SCORES_FILE.match(str(path).rstrip("/").rsplit("/", 1)[-1])
        return int(match.group(1)) if match else None

    def round_dir(self, version: int) -> str:
        """A trainer round's state on `version`: checkpoints, done.json, eval.json, its lock."""
        return f"{self.dir}/rounds/v{version:04d}"

    def round_versions(self) -> list[int]:
        """Versions with a round folder, ascending."""
        folder = f"{self.dir}/rounds"
        if not self.fs.exists(folder):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        return sorted(int(m.group(1)) for m in map(_VERSION_DIR.match, names) if m)


DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def parse_ref(ref: str) -> tuple[str, int | None]:
    """'faces@v3' or 'faces@3' -> ('faces', 3); 'faces' -> ('faces', None) meaning the latest."""
    name, _, version = ref.partition("@")
    if name and not DATASET_NAME.fullmatch(name):  # a name is a folder under the root: no '/', no '..'
        raise ValueError(f"{ref!r}: dataset names are letters, digits, '_', '.', '-' (not starting with '.')")
    if not version:
        return name, None
    digits = version.lstrip("vV")
    if not digits.isdigit():
        raise ValueError(f"{ref!r}: expected NAME@vN, e.g. faces@v3")
    return name, int(digits)


def list_versions(store: Store) -> list[int]:
    """Committed versions (those with a manifest), ascending."""
    return [v for v, path in store.version_dirs().items() if store.fs.exists(f"{path}/{MANIFEST}")]


def latest_version(store: Store) -> int | None:
    versions = list_versions(store)
    return versions[-1] if versions else None


def resolve_version(store: Store, version: int | None) -> int:
    versions = list_versions(store)
    if not versions:
        raise FileNotFoundError(f"dataset {store.dataset!r} has no versions under {store.root}")
    if version is None:
        return versions[-1]
    if version not in versions:
        raise FileNotFoundError(f"{store.dataset}@v{version} does not exist (versions: {versions})")
    return version

