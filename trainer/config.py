"""The trainer's typed config, one dataclass per concern (data, augmentation, model, optimizer, training,
checkpoint, loss) composed into `TrainConfig`, as torchtitan does it.

Every knob has a default; `to_dict`/`from_dict` round-trip through JSON (stored in checkpoints). The
catalog's `training:` section, `--config` files, command flags and checkpoints written before the split
name fields flat (`lr`, `aug_shift`, `w_lmk2d`): `FLAT_KEYS` is the one map from those names to
`<section>.<field>`, and `from_dict` reads either form.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.settings import shared_root


def _model_file(*parts: str) -> str:
    # A factory, not a constant: FACECURATE_SHARED is read when the config is made, not at import.
    return str(shared_root().joinpath("models", *parts))


@dataclass
class DataConfig:
    """A dataset version in a pipeline.store store, and how it is streamed."""

    root: str = "out/datasets"  # the store root (path or fsspec URL), catalog.yaml's output_root
    dataset: str = "faces"  # 'name@vN' ('faces@v3'); a bare name means the latest version
    num_workers: int = 2  # DataLoader workers; 0 decodes in the training process (exact-resume tests)
    # Cross-fitting: train without the faces of fold `holdout_fold` of `folds` (trainer.data.fold_of), so
    # the model's scores of those faces are out of sample; -1 trains on every face.
    holdout_fold: int = -1
    folds: int = 2
    shuffle_buffer: int = 2048  # rows held for the streaming shuffle (rows are JPEG bytes: ~5 kB each)

    def __post_init__(self) -> None:
        if self.holdout_fold >= self.folds or self.folds < 2:
            raise ConfigError("holdout_fold", f"fold {self.holdout_fold} of {self.folds}: expected -1 (none) "
                              "or 0 .. folds-1, with folds >= 2")

    def holdout(self) -> tuple[int, int] | None:
        return None if self.holdout_fold < 0 else (self.holdout_fold, self.folds)


@dataclass
class AugmentationConfig:
    """trainer.augment: crops like the ones curation makes, and 2DASL's noisy map (its AugmentSettings)."""

    enabled: bool = True  # off: the stored crops and labels as they are, the map drawn from the label
    # wider than the dev detector crops' spread around the reference crops (figures: docs/rounds.md,
    # 'The CPU round trip that beats the teacher', bench/roi_spread.py)
    shift: float = 0.06  # roi centre jitter, fraction of its side
    scale: float = 0.12  # roi side x exp(U(-s, s))
    rotate_deg: float = 12.0
    mirror: float = 0.5
    color: float = 0.3
    blur: float = 0.2
    occlude: float = 0.2
    # Which label the student is given (trainer.augment.choose_map): it must learn to correct labels that
    # can be wrong, so the map is the target with noise only part of the time.
    map_dropout: float = 0.15  # the whole map empty (what the zero-map ablation feeds)
    map_candidate: float = 0.3  # another landmarker's points for the face (a real, independent error)
    map_corrupt: float = 0.35  # the label corrupted (jaw, an eye, the mouth, whole-label moves, L/R swap)
    # More labels per face, read on the same backbone features by the reader and judged by the critic
    # (they train those two alone): their examples multiply at little cost, the backbone's do not.
    map_extra: int = 3
    map_point_dropout: float = 0.1
    map_noise_pct: float = 1.5  # per-point noise of the map's points, % of face size

    def settings(self):
        """The augmentation the data loader applies, or None when it is off."""
        from trainer.augment import AugmentSettings

        if not self.enabled:
            return None
        strengths = dataclasses.asdict(self)
        del strengths["enabled"]
        return AugmentSettings(**strengths)


@dataclass
class ModelConfig:
    """The student (trainer.model.build_model) and its critic (build_critic)."""

    backbone: Literal["mobilenet", "resnet50"] = "mobilenet"  # mobilenet starts as the 3DDFA_V2 teacher
    map_points: Literal["18", "68"] = "18"  # points drawn into the landmark map (2DASL uses 18)
    # The map's +-1 enters the network times this: Adam steps every weight by about lr whatever its
    # gradient, so a scale k is a k-times learning rate for the map's filters (which start at zero,
    # so step 0 is still the teacher). Measured on the CPU rounds (docs/rounds.md): 10 neither made
    # the 80-step student read its map nor helped it; 1 is 2DASL's map.
    map_scale: float = 1.0
    # 0: 2DASL's single-pixel +-1 map; > 0: Gaussian blobs of this std (px) on 0, so the filters learn
    # from the points alone. Measured on an 80-step CPU probe (sigma 2, scale 30): still not read.
    map_sigma: float = 0.0
    # 'late' (default): the label's 68 points are fitted under a learned per-point trust after the
    # backbone (trainer.model.LabelReader), so the student reads its label from the first step;
    # 'early': 2DASL's 4th channel alone (what a GPU run of the paper's ResNet-50 from scratch uses).
    map_fusion: Literal["late", "early"] = "late"
    reader_steps: int = 2  # Gauss-Newton steps of the reader's fit
    freeze_bn: bool | None = None  # BN in eval mode; None: frozen for mobilenet (keeps step 0 == teacher)
    teacher_weights: str = field(default_factory=lambda: _model_file("3ddfa_v2", "mb05_120x120.pth"))
    bfm_path: str = field(default_factory=lambda: _model_file("bfm", "bfm_68.npz"))
    param_stats_path: str = field(
        default_factory=lambda: _model_file("3ddfa_v2", "param_mean_std_62d_120x120.pkl"))
    encoder_width: int = 16  # critic encoder's first conv channels (doubling, capped at 8x): at 16 E costs
    # about what the MobileNet regressor does per image; 2DASL does not give its widths

    def __post_init__(self) -> None:
        if self.backbone not in ("mobilenet", "resnet50"):
            raise ConfigError("backbone", f"{self.backbone!r} is not 'mobilenet' or 'resnet50'")
        self.map_points = str(self.map_points)  # JSON/YAML may give 18 as an int
        if self.map_points not in ("18", "68"):
            raise ConfigError("map_points", f"{self.map_points!r} is not '18' or '68'")
        if self.map_fusion not in ("late", "early"):
            raise ConfigError("map_fusion", f"{self.map_fusion!r} is not 'late' or 'early'")

    @property
    def bn_frozen(self) -> bool:
        return self.backbone == "mobilenet" if self.freeze_bn is None else self.freeze_bn


@dataclass
class OptimizerConfig:
    """The regressor's AdamW and its schedule; the reader's and the critic's Adam."""

    # AdamW for the regressor. Small and warmed up: the student starts as the teacher, and at 1e-4 with
    # no warm-up the first step alone threw its landmarks far off on the training batch (every weight
    # moves by about lr at once; figures: docs/rounds.md, 'How the settings were chosen'). A randomly
    # initialised ResNet-50 wants more (3e-4).
    lr: float = 3e-5
    weight_decay: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine decays to 0 at training.max_steps
    warmup_steps: int = 10  # linear warm-up steps before the schedule
    grad_clip: float = 10.0  # max global grad norm of the regressor; 0 disables
    reader_lr: float = 1e-3  # the reader's and the label critic's own learning rate (they start fresh)
    critic_lr: float = 1e-4  # Adam for the critic side of early fusion (encoder E + discriminator D)


@dataclass
class TrainingConfig:
    """How long, on what, in which precision."""

    batch_size: int = 32
    max_steps: int = 0  # optimiser steps; 0 means run `epochs` full passes
    epochs: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # bf16 autocast; only ever on CUDA (CPU runs stay fp32)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"{self.batch_size} must be >= 1")


@dataclass
class CheckpointConfig:
    """Checkpoints and logs."""

    dir: str = "out/checkpoints/2dasl"
    every: int = 500  # steps between checkpoints; the last step is always saved
    keep: int = 3  # older step checkpoints are deleted
    log_every: int = 10  # steps between logging lines (every step goes to train_log.jsonl)
    resume: bool = False  # continue from the newest checkpoint in `dir`, exactly


@dataclass
class LossConfig:
    """Loss weights (generator side; 0 switches a term off). Names are trainer.losses' terms."""

    # Pseudo-label 2D loss: all 68 projected points vs the teacher's noisy 68 points, per face
    # weighted by its curation weight, distances divided by face size (NME-like, scale-free).
    lmk2d: float = 1.0
    # 2DASL L_2d-con: the map points drawn into the input map vs the same points of the projection
    # of pass 1 (uniform per-landmark weights v_i; face-size normalised).
    con2d: float = 1.0
    # 2DASL L_3d-con: 3D landmarks of pass 1 vs pass 2 (re-fed with pass 1's projected map). Small: a
    # student that ignores its map meets it exactly, so at full weight it pays to ignore the map.
    con3d: float = 0.1
    # 2DASL L_cyc: the input map points vs the projection of pass 2's landmarks.
    cyc: float = 1.0
    # 2DASL L_sc, generator side: BCE(D(E(img), params), real); small, it is only a prior.
    critic: float = 1e-3
    # 2DASL L_3d (WPDC-like, landmark-reprojection weighted) on rows with trusted ref_params.
    params: float = 1.0
    # The image's own estimate (before the label is read) vs the label, as lmk2d: a student given no
    # map, or a map it does not trust, still answers from the image (late fusion only).
    image: float = 0.5
    # The reader's per-point trust vs whether each given point is right, and the 2D answer (the given
    # label kept where trusted, the fit elsewhere) vs the best label (late fusion only).
    trust: float = 0.1
    answer: float = 1.0
    extra: float = 1.0  # the reader's answers and trust on the extra labels (augmentation.map_extra)
    # Anchor: MSE of whitened params to the teacher's params_62, on rows without trusted params;
    # stands in for L_3d when the version has no reference labels (keeps the student near the teacher).
    anchor: float = 0.1

    def weights(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass
class RoundConfig:
    """What a trainer round does with its scores (`trainer/rescore.py`)."""

    # The share (%) of each yaw bin's kept training faces a round drops, worst cycle error first; the
    # drops of earlier rounds stand. 0 turns it off (and earlier rounds' drops lapse). Why 3:
    # `trainer.rescore.ROUND_DROP_WORST_PCT`.
    drop_worst_pct: float = 3.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_worst_pct <= 50.0:
            raise ConfigError("drop_worst_pct", f"{self.drop_worst_pct} must be in [0, 50] (a percentage)")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    round: RoundConfig = field(default_factory=RoundConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "TrainConfig") -> TrainConfig:
        """`data`, nested (`{"optimizer": {"lr": 1e-4}}`) or flat (`{"lr": 1e-4}`, see FLAT_KEYS) or both,
        -> a config; errors name the field as given, `<where>.<field>` (the catalog says `training`)."""
        sections, spelled = _nest(data, where)
        parts = {}
        for name, section_cls in SECTIONS.items():
            try:
                parts[name] = section_cls(**sections.get(name, {}))
            except ConfigError as err:
                raise ConfigError(spelled.get((name, err.field), err.field), err.problem, where) from None
        return cls(**parts)

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any]) -> TrainConfig:
        """A checkpoint's stored config: nested, or flat (written before the split). Checkpoints written
        before the label reader existed have no map_fusion: they are early-fusion students."""
        return cls.from_dict(merge_configs({"map_fusion": "early"}, data), where="checkpoint config")


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}

# The flat names (the catalog's `training:` keys, `facecurate train` flags, checkpoints written before
# the split) -> (section, field). The one place they are mapped: a field keeps its flat name unless
# renamed here.
_RENAMED = {
    "dataset_root": ("data", "root"),
    "augment": ("augmentation", "enabled"),
    **{f"aug_{name}": ("augmentation", name)
       for name in ("shift", "scale", "rotate_deg", "mirror", "color", "blur", "occlude")},
    "checkpoint_dir": ("checkpoint", "dir"),
    "round_drop_worst_pct": ("round", "drop_worst_pct"),
    "checkpoint_every": ("checkpoint", "every"),
    "keep_checkpoints": ("checkpoint", "keep"),
    **{f"w_{f.name}": ("loss", f.name) for f in dataclasses.fields(LossConfig)},
}
FLAT_KEYS: dict[str, tuple[str, str]] = {
    **{f.name: (section, f.name) for section, section_cls in SECTIONS.items()
       for f in dataclasses.fields(section_cls) if (section, f.name) not in set(_RENAMED.values())},
    **_RENAMED,
}
# Every field has exactly one flat name, and no flat name is a section's (`augment: true` vs a section).
assert sorted(FLAT_KEYS.values()) == sorted((section, f.name) for section, section_cls in SECTIONS.items()
                                           for f in dataclasses.fields(section_cls))
assert not set(FLAT_KEYS) & set(SECTIONS)


def _nest(data: dict[str, Any], where: str) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], str]]:
    """Flat and/or nested keys -> ({section: {field: value}}, {(section, field): the key as given})."""
    sections: dict[str, dict[str, Any]] = {}
    spelled: dict[tuple[str, str], str] = {}

    def put(section: str, name: str, value: Any, given: str) -> None:
        if (section, name) in spelled:
            raise ConfigError(given, f"given twice (also as {spelled[section, name]!r})", where)
        sections.setdefault(section, {})[name] = value
        spelled[section, name] = given

    for key, value in data.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, f"a section: expected a mapping of its fields, not {value!r}", where)
            known = {f.name for f in dataclasses.fields(SECTIONS[key])}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ConfigError(f"{key}.{unknown[0]}", f"unknown key (unknown: {unknown}; known keys of "
                                  f"{key}: {sorted(known)})", where)
            for name, inner in value.items():
                put(key, name, inner, f"{key}.{name}")
        elif key in FLAT_KEYS:
            put(*FLAT_KEYS[key], value, key)
        else:
            unknown = sorted(set(data) - set(FLAT_KEYS) - set(SECTIONS))
            raise ConfigError(key, f"unknown key (unknown: {unknown}; known keys: the sections "
                              f"{sorted(SECTIONS)} or the flat names {sorted(FLAT_KEYS)})", where)
    return sections, spelled


def merge_configs(*layers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config dicts, flat or nested, merged field by field (a later layer wins) -> the nested form."""
    merged: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for section, fields in _nest(layer, "TrainConfig")[0].items():
            merged.setdefault(section, {}).update(fields)
    return merged


class ConfigError(ValueError):
    """A TrainConfig field that cannot be used: `<where>.<field>: <problem>`."""

    def __init__(self, field: str, problem: str, where: str = "TrainConfig"):
        super().__init__(f"{where}.{field}: {problem}")
        self.field, self.problem = field, problem


def train_config(defaults: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The catalog's `training:` section as defaults, `overrides` (command flags, a round's paths) on top;
    either may be flat or nested.

    The section is checked alone first, so a bad entry there is named `training.<field>`."""
    TrainConfig.from_dict(dict(defaults), where="training")
    return TrainConfig.from_dict(merge_configs(defaults, overrides))
