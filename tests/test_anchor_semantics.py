"""Anchor semantics (NMI of anchors with the clips' digits) and the consistency diagnostics."""

import numpy as np
import pytest

from msk_jax.experiments import anchor_semantics


def test_digit_labels_from_captions():
    first, present = anchor_semantics.digit_labels(["three one four", "now this number is nine nine", "Zero"])
    assert first.tolist() == [3, 9, 0]
    assert present[0].nonzero()[0].tolist() == [1, 3, 4] and present[1].nonzero()[0].tolist() == [9]
    with pytest.raises(ValueError, match="caption 1 'a cooking step' holds no digit word"):
        anchor_semantics.digit_labels(["one", "a cooking step"])


def test_an_anchor_that_knows_the_digit_scores_far_above_chance():
    rng = np.random.default_rng(0)
    strings = ["".join(map(str, rng.integers(0, 10, rng.integers(3, 7)))) for _ in range(200)]
    first = np.array([int(s[0]) for s in strings])
    present = np.array([[str(d) in s for d in range(10)] for s in strings])
    informed = anchor_semantics.describe(first, first, present, np.random.default_rng(1))   # anchor = the first digit
    blind = anchor_semantics.describe(rng.integers(0, 10, 200), first, present, np.random.default_rng(1))
    assert informed["nmi_first"] == pytest.approx(1.0)
    assert informed["chance_first"] < 0.15 and blind["nmi_first"] < 0.15
    assert abs(blind["nmi_first"] - blind["chance_first"]) < 0.05
    assert informed["nmi_present"] > 3 * blind["nmi_present"]
    assert informed["anchors_used"] == 10 and 9 < informed["perplexity"] <= 10
    assert anchor_semantics.usage(np.zeros(50, int)) == (1, 1.0)


def test_digit_heatmap_is_per_anchor_digit_frequency():
    present = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], bool)
    matrix, counts = anchor_semantics.digit_heatmap(np.array([0, 0, 2]), present, num_anchors=3)
    assert counts.tolist() == [2, 0, 1]
    np.testing.assert_allclose(matrix, [[1, 0.5, 0.5], [0, 0, 0], [0, 0, 1]])


def test_random_anchors_replace_only_the_anchors():
    params = {"input_anchors_text": np.ones((4, 3), np.float32), "joint_anchors_audio": np.ones((4, 5), np.float32),
              "text_proj": {"kernel": np.ones((2, 2), np.float32)}}
    for m in ("video", "audio"):
        params.setdefault(f"input_anchors_{m}", np.ones((4, 3), np.float32))
    for m in ("text", "video"):
        params[f"joint_anchors_{m}"] = np.ones((4, 5), np.float32)
    out = anchor_semantics.with_random_anchors({"params": params, "batch_stats": {}}, seed=0)["params"]
    assert out["text_proj"] is params["text_proj"]
    assert out["input_anchors_text"].shape == (4, 3) and not np.allclose(out["input_anchors_text"], 1)
    assert not np.allclose(out["input_anchors_text"], out["input_anchors_video"])


def test_nmi_is_scikit_learns():
    from sklearn.metrics import normalized_mutual_info_score

    rng = np.random.default_rng(0)
    for n, ka, kb in ((200, 16, 2), (50, 4, 10), (30, 1, 3), (12, 1, 1), (40, 5, 5)):
        a, b = rng.integers(0, ka, n), rng.integers(0, kb, n)
        for x, y in ((a, b), (a, a), (a, a > 2)):
            assert anchor_semantics.nmi(x, y) == pytest.approx(normalized_mutual_info_score(x, y), abs=1e-12)
