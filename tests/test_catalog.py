"""The typed catalog: the bundled one loads as is; every bad field fails naming file and field path."""

from __future__ import annotations

import pytest
import yaml

from pipeline.catalog import CatalogError, load_catalog
from tests.conftest import ROOT


def test_bundled_catalog_loads_with_shared_paths_resolved():
    catalog = load_catalog(ROOT / "catalog.yaml")
    assert [s.name for s in catalog.sources] == ["aflw2000-dev", "aflw-wild-crops", "scenes"]
    assert catalog.detectors.landmarkers[0].name == "tddfa_mb05"
    for source in catalog.sources:
        assert "${" not in source.path and source.path.startswith("/")
    assert catalog.output_root == str(ROOT / "out" / "datasets")
    assert catalog.schedule.cron == "0 3 * * *"


def _edit(tmp_path, change) -> str:
    data = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    change(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    return str(err.value)


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda d: d["sources"][1].update(kind="ftp"), "bad.yaml: sources[1]"),
        (lambda d: d["sources"][2].pop("path"), "bad.yaml: sources[2].path: Field required"),
        (lambda d: d["sources"][0].update(split="test"), "bad.yaml: sources[0].split"),
        (lambda d: d["sources"][0].update(pre_croped=True), "bad.yaml: sources[0].pre_croped: Extra inputs"),
        (lambda d: d["rules"]["drop"].append({"feature": "beauty", "min": 1}), "bad.yaml: rules.drop[4].feature"),
        (lambda d: d["rules"]["drop"].append({"feature": "blur"}), "bad.yaml: rules.drop[4]: Value error, a drop rule needs"),
        (lambda d: d["detectors"]["face"].update(name="peppa68"), "is not a face detector"),
        (lambda d: d["detectors"]["landmarkers"][0]["options"].update(bogus=1),
         "bad.yaml: detectors.landmarkers[0].options.bogus"),
        (lambda d: d["schedule"].update(cron="every day"), "bad.yaml: schedule.cron"),
        (lambda d: d["sources"].append(dict(d["sources"][0])), "names must be unique"),
        (lambda d: d["sources"][0].update(path="${NO_SUCH_VAR_X}/x"), "sources[0].path: environment variable ${NO_SUCH_VAR_X}"),
        (lambda d: d.update(dataset="../escape"), "bad.yaml: dataset: String should match pattern"),
    ],
)
def test_bad_catalog_names_the_field(tmp_path, change, expected):
    assert expected in _edit(tmp_path, change)


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("sources: [unclosed")
    with pytest.raises(CatalogError, match="c.yaml: not valid YAML"):
        load_catalog(bad)
    with pytest.raises(CatalogError, match="catalog file not found"):
        load_catalog(tmp_path / "nope.yaml")


def test_yaml_tags_are_not_executed(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("dataset: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(evil)


def test_content_hash_ignores_location_but_not_meaning(tmp_path):
    a = load_catalog(ROOT / "catalog.yaml")
    copy = tmp_path / "catalog.yaml"
    text = (ROOT / "catalog.yaml").read_text().replace("output_root: out/datasets", f"output_root: {ROOT}/out/datasets")
    copy.write_text(text)
    assert load_catalog(copy).content_hash() == a.content_hash()
    copy.write_text(text.replace("min: 40", "min: 41"))
    changed = load_catalog(copy)
    assert changed.content_hash() != a.content_hash() and changed.rules_hash() != a.rules_hash()


@pytest.mark.parametrize(
    "training, expected",
    [
        ({"max_step": 2}, "bad.yaml: training.max_step: unknown key"),
        ({"backbone": "vgg"}, "bad.yaml: training.backbone: 'vgg' is not"),
        ({"batch_size": 0}, "bad.yaml: training.batch_size: 0 must be >= 1"),
    ],
)
def test_commands_check_the_training_section_naming_the_field(tmp_path, training, expected):
    """The pipeline keeps `training:` as a dict; the commands' loader checks it against TrainConfig."""
    from flows.catalog import load_catalog as load_for_commands

    data = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    data["training"] = training
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_catalog(path).training == training  # the pipeline alone does not judge it
    with pytest.raises(CatalogError) as err:
        load_for_commands(path)
    assert expected in str(err.value)


def test_unknown_detector_lists_the_registered_names(tmp_path):
    message = _edit(tmp_path, lambda d: d["detectors"]["landmarkers"][0].update(name="dlib68"))
    assert "bad.yaml: detectors.landmarkers[0].name" in message and "unknown detector 'dlib68'" in message
    assert "tddfa_mb05" in message and "openseeface" in message and "scrfd" in message


def test_a_registry_line_is_all_a_new_landmarker_needs(tmp_path, monkeypatch):
    """The catalog accepts any name the registry lists (here a second name for Peppa's module)."""
    from pipeline.detect import registry, spec

    monkeypatch.setitem(registry.LANDMARKERS, "peppa68_copy", registry.LANDMARKERS["peppa68"])
    data = yaml.safe_load((ROOT / "catalog.yaml").read_text())
    data["detectors"]["landmarkers"].append({**data["detectors"]["landmarkers"][1], "name": "peppa68_copy"})
    path = tmp_path / "more.yaml"
    path.write_text(yaml.safe_dump(data))
    catalog = load_catalog(path)
    assert catalog.detectors.landmarkers[-1].name == "peppa68_copy"
    assert type(spec.validate_options(catalog.detectors.landmarkers[-1])).__name__ == "PeppaOptions"
