"""The losses across real gloo processes: with 2 and 4 ranks, each holding a slice of the batch, the
loss and the gradient of every parameter (towers and temperatures) equal those of one process
holding the whole batch, for the plain, tiled and sigmoid losses, with missing modalities, several
pairs and label-aware negatives. And cached-feature accumulation equals one large batch."""

from __future__ import annotations

import pytest
import torch

from contrastive.accumulate import cached_accumulation
from contrastive.builders import build_loss, build_objective

from datasets import tiny_modalities
from dist_utils import run_ranks

VARIANTS = {
    "plain": dict(name="infonce"),
    "tiled": dict(name="infonce", tile_size=3),
    "siglip": dict(name="siglip", temperature={"init": 0.1}),
    "plain-labels": dict(name="infonce", label_aware=True),
    "tiled-labels": dict(name="infonce", tile_size=5, label_aware=True),
    "siglip-labels": dict(name="siglip", label_aware=True),
}
MODS = ("image", "audio", "text")


def make_objective(variant: str):
    torch.manual_seed(0)
    mods = tiny_modalities(MODS)
    loss = build_loss(
        list(mods),
        dict(
            pairs="all",
            temperatures={"audio-text": {"init": 0.05, "learnable": False}},
            weights={"image-audio": 0.7},
            **VARIANTS[variant],
        ),
    )
    objective = build_objective(mods, embed_dim=16, loss=loss)
    with torch.no_grad():  # non-default temperatures and biases, so their gradients are not special
        for p in objective.loss.parameters():
            p.add_(0.1)
    return objective


def global_batch(n: int, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    mods = tiny_modalities(MODS)
    batch = {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "audio": torch.randn(n, 1, 32, mods["audio"].frames, generator=g),
        "text": torch.randint(1, 1000, (n, 16), generator=g),
        "label_id": torch.randint(-1, 3, (n,), generator=g),
    }
    batch["mask"] = {m: torch.rand(n, generator=g) > 0.25 for m in MODS}
    return batch


def slice_batch(batch: dict, lo: int, hi: int) -> dict:
    out = {k: v[lo:hi] for k, v in batch.items() if torch.is_tensor(v)}
    out["mask"] = {m: v[lo:hi] for m, v in batch["mask"].items()}
    return out


def loss_and_grads(objective, batch) -> tuple[float, dict[str, torch.Tensor]]:
    objective.zero_grad()
    loss, logs = objective(batch)
    loss.backward()
    total = sum(v for k, v in logs.items() if k.startswith("loss/"))
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return float(total), average_over_ranks(grads)


def average_over_ranks(grads: dict) -> dict:
    """What DDP and DeepSpeed do to gradients: the mean over ranks."""
    import torch.distributed as dist

    if dist.is_initialized():
        for g in grads.values():
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return grads


def rank_results(per_rank: int) -> dict:
    import torch.distributed as dist

    rank = dist.get_rank()
    batch = global_batch(per_rank * dist.get_world_size())
    out = {}
    for variant in VARIANTS:
        out[variant] = loss_and_grads(
            make_objective(variant), slice_batch(batch, rank * per_rank, (rank + 1) * per_rank)
        )
    return out


def assert_same(result, reference, variant):
    """Equal up to fp32 rounding. The absolute tolerance scales with each tensor's largest gradient:
    entries near 0 in a tensor whose others reach ~20 are sums of terms that large, and another
    summation order moves them by ~10 ulps of 20 (1.3e-05 on one thread with AVX2 kernels, which
    a fixed 1e-05 refused); a wrong term moves them by orders of magnitude more."""
    loss, grads = result
    ref_loss, ref_grads = reference
    assert loss == pytest.approx(ref_loss, abs=1e-5), variant
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        ref = ref_grads[name]
        atol = 1e-5 * max(1.0, ref.abs().max().item())
        assert torch.allclose(g, ref, atol=atol, rtol=1e-4), f"{variant}: {name}"


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_equal_one_process_with_the_whole_batch(world):
    per_rank = 4
    batch = global_batch(per_rank * world)
    reference = {v: loss_and_grads(make_objective(v), batch) for v in VARIANTS}
    for v in VARIANTS:  # the fixed temperature gets no gradient; learnable ones and the towers do
        assert "loss.losses.audio-text.logit_scale" not in reference[v][1]
        assert "loss.losses.image-text.logit_scale" in reference[v][1]
    for rank, result in enumerate(run_ranks(world, rank_results, per_rank)):
        for v in VARIANTS:
            assert_same(result[v], reference[v], f"{v}, rank {rank} of {world}")


def test_tiled_equals_plain_forward_and_backward():
    batch = global_batch(11)
    for plain, tiled in (("plain", "tiled"), ("plain-labels", "tiled-labels")):
        assert_same(loss_and_grads(make_objective(tiled), batch), loss_and_grads(make_objective(plain), batch), tiled)


def accumulated(variant: str, micro: list[dict]):
    objective = make_objective(variant)
    objective.zero_grad()
    loss, logs = cached_accumulation(objective.model, objective.loss, micro)
    total = sum(v for k, v in logs.items() if k.startswith("loss/"))
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return float(total), average_over_ranks(grads)


@pytest.mark.parametrize("variant", ["plain", "tiled-labels", "siglip"])
def test_cached_accumulation_equals_one_large_batch(variant):
    batch = global_batch(12)
    micro = [slice_batch(batch, i, i + 4) for i in (0, 4, 8)]
    assert_same(accumulated(variant, micro), loss_and_grads(make_objective(variant), batch), variant)


def rank_accumulated(per_rank: int, k: int) -> tuple:
    import torch.distributed as dist

    rank = dist.get_rank()
    batch = global_batch(per_rank * dist.get_world_size())
    mine = slice_batch(batch, rank * per_rank, (rank + 1) * per_rank)
    step = per_rank // k
    return accumulated("plain", [slice_batch(mine, i, i + step) for i in range(0, per_rank, step)])


def test_cached_accumulation_across_ranks_equals_one_large_batch():
    reference = loss_and_grads(make_objective("plain"), global_batch(12))
    for result in run_ranks(2, rank_accumulated, 6, 3):
        assert_same(result, reference, "2 ranks x 3 micro-batches")
