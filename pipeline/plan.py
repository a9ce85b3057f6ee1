"""Plan a build: what the sources offer that the parent version does not hold yet, in batches.

Also the plan's checks (the detector chain against the parent's, a round's scores against the parent)
and the clean-up of what a crashed build left (uncommitted versions, other parents' staging).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.catalog import Catalog, store_of
from pipeline.labeling import get_chain
from pipeline.sources import SourceItem, list_items
from pipeline.store.faces import read_side_table
from pipeline.store.layout import latest_version, list_versions
from pipeline.store.manifest import Manifest
from pipeline.store.schema import SCHEMA_VERSION, conform_quarantine

log = logging.getLogger(__name__)


@dataclass
class Batch:
    key: str  # content key of the batch: same items + same parent + same chain -> same key
    items: list[SourceItem]


@dataclass
class BuildPlan:
    dataset: str
    parent: int | None
    listed: int  # items the sources offer now
    unchanged: int  # items already in the parent's ledger (not read again)
    batches: list[Batch]
    rules_changed: bool
    staging_key: str
    # uris the parent quarantined for a transient fault (timeout, 5xx, model error) and listed again:
    # planned as new, and their old ledger and quarantine rows are replaced at commit
    retry_uris: frozenset[str] = frozenset()
    # the detector chain differs from the parent's: every listed item is labelled again and the new
    # version holds only the new labels (`chain_change` says what changed)
    relabel: bool = False
    chain_change: str = ""

    @property
    def new_items(self) -> int:
        return sum(len(b.items) for b in self.batches)

    @property
    def nothing_to_do(self) -> bool:
        return not self.batches and not self.rules_changed and not self.relabel and self.parent is not None


def _chain_hash(catalog: Catalog) -> str:
    return hashlib.sha256(json.dumps(catalog.detectors.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def chain_identity(catalog: Catalog) -> list[dict]:
    """The manifest's `detectors`: role, name, weights path and the sha256 the weights are checked against."""
    from pipeline.weights import KNOWN_SHA256

    chain = get_chain(catalog.detectors)
    out = [dict(d, weights_sha256=(s.sha256 or KNOWN_SHA256.get(str(d["weights"]).rsplit("/", 1)[-1])))
           for d, s in zip(chain.identity(), [catalog.detectors.face, *catalog.detectors.landmarkers])]
    if catalog.detectors.verifier is not None:  # its weights decide the labels as much as a landmarker's
        from pipeline.fusion import FUSION_RULE
        from pipeline.verifier import SHIPPED_WEIGHTS
        from pipeline.weights import sha256_file

        spec = catalog.detectors.verifier
        path = spec.weights or SHIPPED_WEIGHTS
        out.append({"role": "verifier", "name": "verifier", "weights": str(path),
                    "weights_sha256": sha256_file(path) if Path(path).is_file() else None,
                    "fuse": spec.fuse, "tau_pct": spec.tau_pct, "fusion": FUSION_RULE})
    return out


def chain_change(old: list[dict] | None, new: list[dict]) -> str:
    """'' when two manifests' detector chains label alike (same models, same weight digests; a moved
    weights folder is no change), else what differs, e.g. 'tddfa_mb05 weights: f93ed7f1c4c0 -> 0a1b2c3d4e5f'."""
    if old is None:
        return ""

    def key(d):  # the digest identifies the weights; the path only where no digest is known
        return (d.get("role"), d.get("name"), d.get("weights_sha256") or d.get("weights"), d.get("fuse"),
                d.get("tau_pct"), d.get("fusion"))

    if [key(d) for d in old] == [key(d) for d in new]:
        return ""
    changes = []
    for a, b in zip(old, new):
        if (a.get("role"), a.get("name")) != (b.get("role"), b.get("name")):
            changes.append(f"{a.get('role')} {a.get('name')} -> {b.get('name')}")
        elif a.get("fusion") != b.get("fusion"):
            changes.append(f"fusion rule {a.get('fusion')} -> {b.get('fusion')}")
        elif key(a) != key(b):
            short = lambda d: str(d.get("weights_sha256") or d.get("weights"))[:12]  # noqa: E731
            changes.append(f"{b.get('name')} weights: {short(a)} -> {short(b)}")
    if len(old) != len(new):
        changes.append(f"landmarkers: {[d.get('name') for d in old[1:]]} -> {[d.get('name') for d in new[1:]]}")
    return "; ".join(changes)


MIN_BATCH_IMAGES = 8  # below this a batch's fixed costs (a part file, the detector's batched call) weigh


def batch_size(images: int, batch_images: int, min_batches: int) -> int:
    """Images per batch for a build of `images` new images: the catalog's `batch_images`, or less so that
    the build has at least `min_batches` batches, though never under MIN_BATCH_IMAGES (nor over
    `batch_images`)."""
    spread = -(-images // min_batches)  # ceil: min_batches batches, the last one possibly short
    return min(batch_images, max(spread, MIN_BATCH_IMAGES))


def plan_build(catalog: Catalog) -> BuildPlan:
    """List every source; what the parent's ledger already holds is skipped without reading it.

    Items the parent quarantined for a transient fault are planned again. When the detector chain
    differs from the parent's (another model or other weights), every item is planned again.
    """
    store = store_of(catalog)
    parent = latest_version(store)
    known: set[str] = set()
    retry: set[str] = set()
    rules_changed, change = False, ""
    if parent is not None:
        manifest = Manifest.read(store, parent)
        rules_changed = manifest.rules_hash != catalog.rules_hash()
        change = chain_change(manifest.detector_dicts(), chain_identity(catalog))
        if not change and manifest.schema_version != SCHEMA_VERSION:
            change = f"shard schema v{manifest.schema_version} -> v{SCHEMA_VERSION}"
        if change:
            log.warning("%s: detector chain changed since v%d (%s): re-labelling every listed image into the "
                        "next version, which holds only the new labels (v%d stays as it was)",
                        catalog.dataset, parent, change, parent)
        else:
            quarantine = conform_quarantine(read_side_table(store, parent, "quarantine"))
            retry = {u for u, r in zip(quarantine.column("uri").to_pylist(),
                                       quarantine.column("retryable").to_pylist()) if r}
            images = read_side_table(store, parent, "images")
            known = {k for k, u, st in zip(images.column("stat_key").to_pylist(), images.column("uri").to_pylist(),
                                           images.column("status").to_pylist())
                     if not (st == "quarantined" and u in retry)}
    fresh: list[SourceItem] = []
    retried: set[str] = set()
    listed = 0
    for source in catalog.sources:
        for item in list_items(source):
            listed += 1
            if item.stat_key not in known:
                fresh.append(item)
                if item.uri in retry:
                    retried.add(item.uri)
    if retried:
        log.info("%s: trying %d images again that v%d quarantined for a transient fault",
                 catalog.dataset, len(retried), parent)
    size = batch_size(len(fresh), catalog.execution.batch_images, catalog.execution.min_batches)
    chain = _chain_hash(catalog)
    batches = []
    for start in range(0, len(fresh), size):
        items = fresh[start : start + size]
        digest = hashlib.sha256(f"{parent}|{chain}|{catalog.limits.model_dump_json()}".encode())
        for item in items:
            digest.update(item.stat_key.encode() + b"\n")
        batches.append(Batch(digest.hexdigest()[:20], items))
    return BuildPlan(catalog.dataset, parent, listed, listed - len(fresh), batches, rules_changed,
                     staging_key=f"p{parent or 0:04d}-{chain[:12]}", retry_uris=frozenset(retried),
                     relabel=bool(change), chain_change=change)


def check_scores_parent(plan: BuildPlan, scores: pa.Table | None, version: int | None = None) -> None:
    """A trainer round's scores must be for the version this build extends (else faces would mismatch)."""
    if scores is None:
        return
    if plan.parent is None:
        raise ValueError("scores need a parent version to fold into; build the dataset first")
    if plan.relabel:
        raise ValueError(f"the detector chain changed since v{plan.parent} ({plan.chain_change}), so this build "
                         "re-labels every image and the scores would not fit the new labels; build without "
                         "--scores first, then train and rescore the new version")
    if version is not None and version != plan.parent:
        raise ValueError(f"the scores are for v{version}, but this build extends v{plan.parent}; "
                         f"rescore v{plan.parent} first")


def clean_abandoned(catalog: Catalog) -> list[str]:
    """Remove version dirs without a manifest (crashed commits) and staging of other parents.
    Call under the DatasetLock, before planning."""
    store = store_of(catalog)
    fs = store.fs
    committed = set(list_versions(store))
    removed = []
    for version, path in store.version_dirs().items():
        if version not in committed:
            fs.rm(path, recursive=True)
            removed.append(path)
    latest = max(committed) if committed else 0
    for key, path in store.staging_dirs().items():
        if not key.startswith(f"p{latest:04d}-"):
            fs.rm(path, recursive=True)
            removed.append(path)
    return removed
