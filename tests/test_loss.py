"""InfoNCE: a hand-computed value, masking, temperatures, pair selection."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from contrastive.loss import ContrastiveLoss, InfoNCESettings, Temperature, info_nce, resolve_pairs
from contrastive.modalities import ConfigError


def test_hand_computed_value():
    # a = b = identity, logit scale 1: each row's logits are (1, 0), so each cross-entropy term is
    # -log(e / (e + 1)) = log(1 + 1/e) = 0.3132617, in both directions.
    a = torch.eye(2)
    loss = info_nce(a, a.clone(), torch.tensor([True, True]), torch.tensor(1.0))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert math.log(1 + math.exp(-1)) == pytest.approx(0.3132617, abs=1e-7)


def reference(a: np.ndarray, b: np.ndarray, scale: float) -> float:
    """CLIP's loss written out with numpy: mean of the two directions' cross-entropies."""
    logits = scale * a @ b.T

    def ce(lg):
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        return float(np.mean(lse - np.diag(lg)))

    return (ce(logits) + ce(logits.T)) / 2


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_matches_numpy_reference():
    a, b = unit(7, 5, 0), unit(7, 5, 1)
    loss = info_nce(a, b, torch.ones(7, dtype=torch.bool), torch.tensor(14.3))
    assert loss.item() == pytest.approx(reference(a.numpy(), b.numpy(), 14.3), rel=1e-5)


def test_missing_rows_drop_out_of_the_pair_only():
    a, b = unit(6, 4, 2), unit(6, 4, 3)
    valid = torch.tensor([True, False, True, True, False, True])
    keep = valid.nonzero().flatten()
    masked = info_nce(a, b, valid, torch.tensor(10.0))
    subset = info_nce(a[keep], b[keep], torch.ones(len(keep), dtype=torch.bool), torch.tensor(10.0))
    assert masked.item() == pytest.approx(subset.item(), rel=1e-6)
    # and the masked rows get no gradient, the others do
    a = a.clone().requires_grad_()
    info_nce(a, b, valid, torch.tensor(10.0)).backward()
    assert torch.all(a.grad[~valid] == 0) and torch.all(a.grad[valid].abs().sum(1) > 0)


def test_no_valid_row_gives_zero_and_finite_gradients():
    a = unit(3, 4, 4).requires_grad_()
    loss = info_nce(a, unit(3, 4, 5), torch.zeros(3, dtype=torch.bool), torch.tensor(10.0))
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(a.grad).all()


def test_pairs_from_config():
    mods = ["image", "audio", "text"]
    assert resolve_pairs("all", mods) == [("image", "audio"), ("image", "text"), ("audio", "text")]
    assert resolve_pairs("anchor:image", mods) == [("image", "audio"), ("image", "text")]
    assert resolve_pairs([["audio", "text"]], mods) == [("audio", "text")]
    with pytest.raises(ConfigError, match="anchor 'depth'"):
        resolve_pairs("anchor:depth", mods)
    with pytest.raises(ConfigError, match="not a pair"):
        resolve_pairs([["audio", "video"]], mods)
    with pytest.raises(ConfigError, match="expected 'all'"):
        resolve_pairs("everything", mods)


def test_temperatures_learnable_fixed_and_clamped():
    emb = {"image": unit(4, 8, 6), "text": unit(4, 8, 7), "audio": unit(4, 8, 8)}
    mask = {k: torch.ones(4, dtype=torch.bool) for k in emb}
    learn = image_text(temperature=Temperature(0.07, learnable=True))
    loss, logs = learn(emb, mask)
    loss.backward()
    assert learn.losses["image-text"].logit_scale.grad is not None
    assert logs["logit_scale/image-text"].item() == pytest.approx(1 / 0.07, rel=1e-5)

    fixed = image_text(temperature=Temperature(0.05, learnable=False))
    assert not fixed.losses["image-text"].logit_scale.requires_grad
    assert fixed.scales()["image-text"].item() == pytest.approx(20.0, rel=1e-5)

    hot = image_text(temperature=Temperature(0.001))
    assert hot.scales()["image-text"].item() == pytest.approx(100.0)


def image_text(**settings) -> ContrastiveLoss:
    return ContrastiveLoss(InfoNCESettings(pairs=[["image", "text"]], **settings), ["image", "text", "audio"])


def test_pairs_are_summed_with_weights():
    emb = {"image": unit(5, 8, 9), "text": unit(5, 8, 10), "audio": unit(5, 8, 11)}
    mask = {k: torch.ones(5, dtype=torch.bool) for k in emb}
    mask["audio"][0] = False
    loss_fn = ContrastiveLoss(
        InfoNCESettings(
            pairs=[["image", "text"], ["audio", "text"]], temperature=Temperature(0.1), weights={"audio-text": 0.5}
        ),
        list(emb),
    )
    total, logs = loss_fn(emb, mask)
    it = info_nce(emb["image"], emb["text"], mask["image"] & mask["text"], torch.tensor(10.0))
    at = info_nce(emb["audio"], emb["text"], mask["audio"] & mask["text"], torch.tensor(10.0))
    assert total.item() == pytest.approx(it.item() + 0.5 * at.item(), rel=1e-5)
    assert logs["loss/audio-text"].item() == pytest.approx(at.item(), rel=1e-6)
    with pytest.raises(ConfigError, match="not configured pairs"):
        image_text(weights={"image-audio": 1.0})
