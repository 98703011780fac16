"""The shared space's telemetry against hand computations on a fixed batch, the pairs' gradient shares,
and the adaptive pair weights (their rules, bounds, and their place in checkpoints)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.geometry import alignment, effective_rank, gap, geometry, margin, uniformity
from contrastive.loss import ContrastiveLoss, InfoNCESettings
from contrastive.loss.balance import PairBalance

A = F.normalize(
    torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64), dim=-1
)
B = F.normalize(
    torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.0], [1.0, 0.8, 0.3], [0.0, 0.3, 1.0]], dtype=torch.float64), dim=-1
)


def test_effective_rank_from_the_gram_matrix_equals_the_svd_of_the_batch():
    g = torch.Generator().manual_seed(0)
    for rows, dim in ((300, 16), (8, 64), (64, 64)):  # more rows than dimensions, fewer, as many
        x = F.normalize(torch.randn(rows, dim, generator=g) @ torch.randn(dim, dim, generator=g), dim=-1)
        s = torch.linalg.svdvals(x.double())
        p = s / s.sum()
        assert effective_rank(x) == pytest.approx(math.exp(-float((p * p.log()).sum())), rel=1e-9)


def test_each_quantity_equals_its_hand_computation():
    n = len(A)
    pairs = [(i, j) for i, j in itertools.product(range(n), repeat=2) if i != j]
    by_hand = math.log(sum(math.exp(-2 * float((A[i] - A[j]).square().sum())) for i, j in pairs) / len(pairs))
    assert uniformity(A) == pytest.approx(by_hand, abs=1e-9)
    s = torch.linalg.svdvals(A.double())
    p = s / s.sum()
    assert effective_rank(A) == pytest.approx(math.exp(-float((p * p.log()).sum())), abs=1e-9)
    assert effective_rank(torch.eye(3)) == pytest.approx(3.0) and effective_rank(A[:1].repeat(5, 1)) == pytest.approx(
        1.0
    )
    assert alignment(A, B) == pytest.approx(sum(float((A[i] - B[i]).square().sum()) for i in range(n)) / n, abs=1e-9)
    assert gap(A, B) == pytest.approx(float((A.mean(0) - B.mean(0)).norm()), abs=1e-9)
    sims = A @ B.T
    by_hand = sum(float(sims[i, i]) - max(float(sims[i, j]) for j in range(n) if j != i) for i in range(n)) / n
    assert margin(A, B) == pytest.approx(by_hand, abs=1e-6)
    assert uniformity(A[:1]) != uniformity(A[:1])  # nan: one sample has no pairs


def test_the_batch_geometry_reads_each_modality_and_pair_over_its_samples():
    masks = {"a": torch.tensor([True, True, True, False]), "b": torch.tensor([True, False, True, True])}
    norms = {"a": torch.tensor([1.0, 2.0, 3.0, 100.0]), "b": torch.ones(4)}
    got = geometry({"a": A * 5, "b": B}, masks, [("a", "b")], norms)  # unnormalised in: normalised for the geometry
    both = masks["a"] & masks["b"]
    assert got["geometry/uniformity/a"] == pytest.approx(uniformity(A[masks["a"]]))
    assert got["geometry/effective_rank/b"] == pytest.approx(effective_rank(B[masks["b"]]))
    assert got["geometry/norm/a"] == pytest.approx(2.0)  # the absent sample's 100 not counted
    assert got["geometry/alignment/a-b"] == pytest.approx(alignment(A[both], B[both]))
    assert got["geometry/gap/a-b"] == pytest.approx(gap(A[masks["a"]], B[masks["b"]]))
    assert got["geometry/margin/a-b"] == pytest.approx(margin(A[both], B[both]))


def embeddings(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {m: F.normalize(torch.randn(n, 8, generator=g), dim=-1).requires_grad_() for m in ("image", "audio", "text")}


def test_each_towers_gradient_shares_sum_to_one_and_follow_the_weights():
    loss = ContrastiveLoss(InfoNCESettings(weights={"image-text": 3.0}), ["image", "audio", "text"])
    loss.measure = True
    emb = embeddings()
    masks = {m: torch.ones(16, dtype=torch.bool) for m in emb}
    _, logs = loss(emb, masks)
    for m in emb:
        shares = [float(v) for k, v in logs.items() if k.startswith(f"grad_share/{m}/")]
        assert len(shares) == 2 and sum(shares) == pytest.approx(1.0)
    # a pair's share is its weighted gradient's norm: tripling image-text's weight shows
    unweighted = ContrastiveLoss(InfoNCESettings(), ["image", "audio", "text"])
    unweighted.measure = True
    _, plain = unweighted(emb, masks)
    assert float(logs["grad_share/image/image-text"]) > float(plain["grad_share/image/image-text"])
    assert "geometry/uniformity/audio" in logs and "geometry/gap/image-text" in logs


def test_a_frozen_tower_and_a_non_finite_batch_leave_the_telemetry_standing():
    loss = ContrastiveLoss(InfoNCESettings(), ["image", "audio", "text"])
    loss.measure = True
    emb = embeddings()
    emb["image"] = emb["image"].detach()  # a frozen tower: its embeddings carry no gradient
    masks = {m: torch.ones(16, dtype=torch.bool) for m in emb}
    _, logs = loss(emb, masks)
    assert float(logs["grad_share/image/image-text"]) == 0.0
    assert sum(float(v) for k, v in logs.items() if k.startswith("grad_share/audio/")) == pytest.approx(1)
    broken = {m: torch.full((4, 3), math.nan) for m in ("a", "b")}
    got = geometry(broken, {m: torch.ones(4, dtype=torch.bool) for m in broken}, [("a", "b")])
    assert math.isnan(got["geometry/effective_rank/a"])


def test_progress_favours_the_pair_that_lags():
    balance = PairBalance(["fast", "slow"], "progress", rate=0.5)
    balance.update(torch.tensor([4.0, 4.0]))  # the start
    for _ in range(10):
        balance.update(torch.tensor([1.0, 3.5]))  # fast fell to a quarter, slow hardly moved
    assert balance.weight("slow") > 1.5 > 1.0 > balance.weight("fast")
    assert balance.weight("slow") + balance.weight("fast") == pytest.approx(2.0)


def test_gradnorm_evens_the_gradients_when_progress_is_even_and_stays_bounded():
    balance = PairBalance(["big", "small", "mid"], "gradnorm", rate=0.5, max_weight=3.0)
    losses = torch.tensor([2.0, 2.0, 2.0])
    for _ in range(50):
        balance.update(losses, torch.tensor([10.0, 1.0, 3.0]))  # big dominates the towers' gradient
    w = [balance.weight(n) for n in ("big", "small", "mid")]
    assert w[0] < w[2] < w[1] and sum(w) == pytest.approx(3.0)
    assert min(w) >= 1 / 3.0 - 1e-9 and max(w) <= 3.0  # within the bounds, and still summing to 3


@pytest.mark.parametrize("rule", ["progress", "gradnorm"])
def test_balanced_weights_train_the_loss_and_travel_in_its_state(rule):
    settings = InfoNCESettings(balance=rule, balance_rate=0.3)
    loss = ContrastiveLoss(settings, ["image", "audio", "text"])
    masks = {m: torch.ones(16, dtype=torch.bool) for m in ("image", "audio", "text")}
    for seed in range(4):
        total, logs = loss(embeddings(seed=seed), masks)
        total.backward()
    weights = {k: float(v) for k, v in logs.items() if k.startswith("balance/")}
    assert len(weights) == 3 and sum(weights.values()) == pytest.approx(3.0) and len(set(weights.values())) > 1
    restored = ContrastiveLoss(settings, ["image", "audio", "text"])
    restored.load_state_dict(loss.state_dict())  # checkpoints carry the weights and the starting losses
    assert torch.equal(restored.balance.weights, loss.balance.weights)
    assert "balance.weights" not in ContrastiveLoss(InfoNCESettings(), ["image", "text"]).state_dict()  # off: no state


def test_a_run_logs_its_geometry_and_plots_it(demo_data, tmp_path):
    from conftest import read_jsonl, run_cli, tiny_overrides

    run_dir = tmp_path / "run"
    run_cli("contrastive-train", *tiny_overrides(demo_data, run_dir, "eval.missing_modality_check=true"))
    rows = read_jsonl(run_dir / "metrics.jsonl")
    step = [r for r in rows if "loss" in r][-1]
    for key in (
        "geometry/uniformity/audio",
        "geometry/gap/image-text",
        "grad_share/text/audio-text",
        "grad_norm/image",
    ):
        assert key in step, key
    final = rows[-1]
    assert final["eval/missing_modality/max_change"] == 0.0  # towers are independent
    for key, value in final.items():
        if key.startswith("eval/missing_modality/retrieval/"):
            assert value == final[key.replace("missing_modality/", "")]
    assert "eval/geometry/effective_rank/text" in final and "eval/zero_shot/audio->text/worst_class_recall" in final
    assert any(k.startswith("eval/zero_shot/image->text/class/") for k in final)  # each class's recall
    assert (run_dir / "geometry.png").stat().st_size > 0 and (run_dir / "space.png").stat().st_size > 0
