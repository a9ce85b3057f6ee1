"""The report flow: the HTML landmark quality report of a version, plus the same summary as Prefect
artifacts (markdown, a table, a link to the HTML file) so the UI shows it under the flow run."""

from __future__ import annotations

import re

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from flows.catalog import load_catalog
from pipeline.catalog import store_for_ref
from pipeline.landmarks import YAW_BINS
from pipeline.report import write_report
from pipeline.store.layout import resolve_version
from pipeline.summary import version_summary


def _artifact_key(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:100]


def summary_markdown(summary: dict, html_path: str) -> str:
    c = summary["manifest"].counts
    lines = [f"# {summary['ref']}", "",
             f"- images: {c.images_seen} seen, {c.images_decoded} decoded, {c.images_quarantined} quarantined",
             f"- faces: {c.faces} found, {c.faces_kept} kept ({summary['kept_fraction']:.1%}), "
             f"{c.faces_dropped} dropped",
             f"- report: `{html_path}`"]
    for name, t in summary["reference_nme"].items():
        lines.append(f"- {name}: balanced NME {t['balanced']:.2f}% vs references "
                     f"(kept {t['kept_mean'] or float('nan'):.2f}%, dropped {t['dropped_mean'] or float('nan'):.2f}%)")
    return "\n".join(lines)


def publish_report(store, version: int, summary: dict, out_dir: str | None = None) -> str:
    """The HTML report of `version` and its artifacts, under the flow run this is called in."""
    path = write_report(store, version, out_dir, summary=summary)
    key = _artifact_key(f"report-{store.dataset}-v{version}")
    create_markdown_artifact(summary_markdown(summary, str(path)), key=key, description="landmark quality summary")
    create_table_artifact([{"yaw": label, **summary["pose_bins"][label]} for label in YAW_BINS],
                          key=key + "-pose", description="faces and kept faces per yaw bin")
    create_link_artifact(path.resolve().as_uri(), link_text=path.name, key=key + "-html",
                         description="the HTML report (opens from disk)")
    get_run_logger().info("report for %s@v%d: %s", store.dataset, version, path)
    return str(path)


@flow(name="report")
def report_version(catalog_path: str = "catalog.yaml", dataset_ref: str | None = None,
                   out_dir: str | None = None) -> str:
    """Write `<dataset>/reports/<dataset>-vNNNN.html` for `dataset_ref` (default: the latest version)."""
    catalog = load_catalog(catalog_path)
    store, version = store_for_ref(catalog, dataset_ref)
    version = resolve_version(store, version)
    return publish_report(store, version, version_summary(store, version), out_dir)
