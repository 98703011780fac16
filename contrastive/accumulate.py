"""Gradient accumulation that grows the negatives (GradCache).

Plain accumulation of k micro-batches contrasts each sample only with its own micro-batch. Here
the loss sees all k micro-batches at once, as one batch k times larger:

1. embed every micro-batch without building a graph (keeping each one's RNG state);
2. compute the loss on the concatenated embeddings of all k (and all ranks) and its gradient with
   respect to those embeddings and to the loss's own parameters (temperatures, biases);
3. replay each micro-batch with a graph and backpropagate its slice of the embedding gradient
   through the towers (a surrogate scalar sum(embedding * gradient)); the last replay also carries
   the loss parameters' gradient, so an engine sees every parameter in one final backward.

The gradients equal those of the single large batch (exact up to float rounding) while activation
memory stays that of one micro-batch.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Mapping, Sequence

import torch


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def cached_accumulation(
    embed: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]],
    loss_fn: torch.nn.Module,
    micro_batches: Sequence[Mapping[str, Any]],
    *,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    replay_context: Callable[[int], ContextManager] = lambda index: nullcontext(),
    autocast: Callable[[], Any] | None = None,
    proceed: Callable[[torch.Tensor, dict[str, torch.Tensor]], bool] = lambda loss, logs: True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Accumulates the gradients of the loss of `micro_batches` taken as one batch.

    `embed(batch)` -> embeddings per modality (the model, or an engine wrapping it); `backward`
    runs one backward pass; `replay_context(index)` wraps the replay of micro-batch `index` (e.g.
    DDP's no_sync() for all but the last); `proceed(loss, logs)` False stops before any backward
    (a non-finite loss). Returns the loss (detached) and the loss's metrics."""
    autocast = autocast or (lambda: nullcontext())

    # 1. embeddings of every micro-batch, no graph
    states, cached = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(_rng_state())
            with autocast():
                cached.append({n: e.float() for n, e in embed(batch).items()})
    names = list(cached[0])
    # 2. the loss of them all at once; gradients w.r.t. the embeddings and the loss's parameters
    features = {n: torch.cat([c[n] for c in cached]).requires_grad_() for n in names}
    masks = {n: torch.cat([b["mask"][n] for b in micro_batches]) for n in names}
    labels = torch.cat([b["label_id"] for b in micro_batches]) if all("label_id" in b for b in micro_batches) else None
    loss, logs = loss_fn(features, masks, labels)
    if not proceed(loss, logs):
        return loss.detach(), logs
    loss_params = [p for p in loss_fn.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [features[n] for n in names] + loss_params, allow_unused=True)
    feature_grads = dict(zip(names, grads[: len(names)]))
    param_grads = grads[len(names) :]
    # 3. replay each micro-batch with a graph and push its slice of the gradient into the towers
    start = 0
    resume_state = _rng_state()
    for index, batch in enumerate(micro_batches):
        rows = batch["mask"][names[0]].shape[0]
        _set_rng_state(states[index])
        with replay_context(index):
            with autocast():
                out = embed(batch)
            surrogate = sum(
                (out[n].float() * feature_grads[n][start : start + rows]).sum()
                for n in names
                if feature_grads[n] is not None
            )
            if index == len(micro_batches) - 1:
                surrogate = surrogate + sum((p * g).sum() for p, g in zip(loss_params, param_grads) if g is not None)
            backward(surrogate)
        start += rows
    _set_rng_state(resume_state)
    return loss.detach(), logs
