"""Rules over stored features: first failed rule is the reason, NaN never drops, weights multiply."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.catalog import DropRule, Rules, WeightRule
from pipeline.landmarks import nme_pct
from pipeline.quality import apply_rules, out_of_frame_frac


def test_drop_rules_in_order_with_reasons():
    features = pd.DataFrame({"face_px": [20.0, 80.0, 80.0, np.nan], "agreement_nme_pct": [30.0, 30.0, 2.0, 2.0]})
    rules = Rules(drop=(DropRule(feature="face_px", min=40), DropRule(feature="agreement_nme_pct", max=10)))
    out = apply_rules(features, rules)
    assert out.keep.tolist() == [False, False, True, True]
    assert out.reject_reason.tolist()[:2] == ["face_px 20 < min 40", "agreement_nme_pct 30 > max 10"]
    assert out.reject_reason.tolist()[2:] == [None, None]
    assert out.weight.tolist()[:2] == [0.0, 0.0]


def test_weights_multiply_and_clip():
    features = pd.DataFrame({"agreement_nme_pct": [0.0, 5.0, 100.0], "flip_nme_pct": [0.0, 4.0, np.nan]})
    rules = Rules(weight=(WeightRule(feature="agreement_nme_pct", offset=2, scale=3),
                          WeightRule(feature="flip_nme_pct", scale=4)), min_weight=0.1)
    w = apply_rules(features, rules).weight.to_numpy()
    assert w[0] == 1.0
    assert np.isclose(w[1], np.exp(-1.0) * np.exp(-1.0), atol=1e-6)
    assert np.isclose(w[2], 0.1)  # clipped; the NaN flip feature costs nothing


def test_nme_and_out_of_frame():
    ref = np.stack([np.linspace(0, 100, 68), np.linspace(0, 100, 68)], axis=1)
    assert nme_pct(ref, ref) == 0.0  # the one NME: quality features and the protocol alike
    assert np.isclose(nme_pct(ref + [3.0, 4.0], ref), 5.0)
    assert out_of_frame_frac(ref, 51, 200) == np.mean(ref[:, 0] > 50)
