"""The student's label reader (late fusion), its training maps and its critic's targets, on cases whose
answers are known without the code under test: points projected from known params, hand-made labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.bfm import landmarks_3d, load_bfm
from pipeline.landmarks import FLIP_68
from trainer import losses
from trainer.augment import CORRUPTIONS, AugmentSettings, choose_map, corrupt_label
from trainer.config import ModelConfig, TrainConfig
from trainer.model import build_model


@pytest.fixture(scope="module")
def reader():
    return build_model(TrainConfig()).reader.eval()


def _face(reader, seed: int = 0) -> torch.Tensor:
    """Whitened params of a plausible face: the mean face, pose and shape moved a little."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 62, generator=g) * 0.3


def test_the_jacobian_is_the_projections_derivative(reader):
    w = _face(reader)
    by_autograd = torch.autograd.functional.jacobian(reader.project, w)  # [2, 68, 2, 2, 62]
    by_autograd = torch.stack([by_autograd[i, :, :, i] for i in range(len(w))])
    torch.testing.assert_close(reader.jacobian(w), by_autograd, atol=1e-4, rtol=1e-4)


def test_the_projection_is_the_bfms(reader):
    cfg = TrainConfig()
    w = _face(reader)
    params = w * reader.std + reader.mean
    torch.testing.assert_close(reader.project(w), landmarks_3d(params, load_bfm(cfg.model.bfm_path))[..., :2])


def _gate(reader, logit: float):
    """The reader with its trust fixed at sigmoid(logit) for every point."""
    torch.nn.init.zeros_(reader.trust[-1].weight)
    torch.nn.init.constant_(reader.trust[-1].bias, logit)


def test_a_trusted_label_is_fitted_and_an_untrusted_one_ignored():
    reader = build_model(TrainConfig(model=ModelConfig(reader_steps=4))).reader.eval()
    truth = _face(reader, 1)
    label = reader.project(truth)  # a label a 3DMM can fit exactly
    start = truth + torch.randn(truth.shape, generator=torch.Generator().manual_seed(2)) * 0.2
    features = torch.zeros(len(truth), 512)
    before = (reader.project(start) - label).norm(dim=-1).mean()
    with torch.no_grad():
        _gate(reader, 8.0)  # trust ~1: the fit goes to the label
        fitted, trust = reader(start, features, label)
        after = (reader.project(fitted) - label).norm(dim=-1).mean()
        assert float(trust.min()) > 0.99
        assert float(after) < 0.05 * float(before), (float(before), float(after))
        _gate(reader, -30.0)  # trust ~0: the image's estimate stands
        kept, _ = reader(start, features, label)
        moved = (reader.project(kept) - reader.project(start)).norm(dim=-1).max()
        assert float(moved) < 0.01 * float(before), (float(before), float(moved))
        # A label with no point given leaves the estimate exactly as it was.
        _gate(reader, 8.0)
        none, trust = reader(start, features, torch.full_like(label, float("nan")))
        torch.testing.assert_close(none, start)
        assert float(trust.abs().max()) == 0.0


def _label() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.uniform(30, 90, size=(68, 2))).astype(np.float32)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_each_corruption_moves_its_region(kind):
    label = _label()
    moved = corrupt_label(label, np.random.default_rng(1), kind)
    changed = np.linalg.norm(moved - label, axis=1) > 1e-4
    regions = {"jaw": range(0, 17), "nose": range(27, 36), "mouth": range(48, 68)}
    if kind in regions:
        assert changed.any() and set(np.flatnonzero(changed)) <= set(regions[kind])
    elif kind == "eye":
        left, right = set(range(17, 22)) | set(range(36, 42)), set(range(22, 27)) | set(range(42, 48))
        assert set(np.flatnonzero(changed)) in (left, right)
    elif kind == "swap":
        np.testing.assert_array_equal(moved, label[FLIP_68])
    else:  # whole-label moves
        assert changed.all()


def test_the_map_is_drawn_from_what_the_settings_say():
    label, other = _label(), _label() + 5.0
    def only(**kw) -> AugmentSettings:
        base = dict(map_dropout=0.0, map_candidate=0.0, map_corrupt=0.0, map_point_dropout=0.0, map_noise_pct=0.0)
        return AugmentSettings(**{**base, **kw})

    rng = np.random.default_rng(0)
    assert np.isnan(choose_map(label, [other], rng, AugmentSettings(map_dropout=1.0))).all()
    np.testing.assert_array_equal(choose_map(label, [other], rng, only(map_candidate=1.0)), other)
    assert not np.allclose(choose_map(label, [other], rng, only(map_corrupt=1.0)), label)
    np.testing.assert_array_equal(choose_map(label, [other], rng, only()), label)  # the label, no noise
    # No candidate for the face: the candidate share falls to the label itself.
    np.testing.assert_array_equal(choose_map(label, [], rng, only(map_candidate=1.0)), label)


def test_the_critics_target_and_the_trust_target_by_hand():
    goodness = losses.label_goodness(torch.tensor([2.0, 3.0, 5.5, 8.0, 12.0, float("nan")]))
    torch.testing.assert_close(goodness[:5], torch.tensor([1.0, 1.0, 0.5, 0.0, 0.0]))
    assert torch.isnan(goodness[5])
    # A 100 x 100 px face: a point 1 px off is right (1% < 3%), one 10 px off is wrong, a NaN is left out.
    target = torch.tensor([[[0.0, 0.0], [100.0, 100.0], [50.0, 50.0]]])
    given = torch.tensor([[[1.0, 0.0], [110.0, 100.0], [float("nan"), 0.0]]])
    trust = torch.tensor([[0.9, 0.2, 0.5]])
    expected = -(np.log(0.9) + np.log(0.8)) / 2
    assert float(losses.trust_loss(trust, given, target)) == pytest.approx(expected, rel=1e-5)
