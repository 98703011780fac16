"""Symmetric InfoNCE (CLIP's loss), exact across ranks, in a plain and a tiled form.

Each rank scores its own rows against the gathered columns of every rank (open_clip's local loss
with a differentiable all-gather), so the loss and its gradients equal those of one process holding
the global batch. Both forms compute the same numbers:

- plain: the [local, global] logit matrix at once (the reference);
- tiled: log-sum-exp over column tiles with an online maximum, and a backward that recomputes each
  [tile, tile] block, so peak memory grows with tile x tile instead of local x global batch.

Masking: a column whose sample lacks either modality is no negative for anyone; with label ids,
columns that share a row's label (other than the row's own partner) are no negatives for that row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from contrastive.distributed import gather_no_grad, gather_with_grad, rank
from contrastive.loss.base import LossSettings, PairLoss, register_loss

# A finite "minus infinity": its exp() is exactly 0 in fp32 after the max is subtracted, and a row
# whose own target is masked (an invalid row) keeps a finite loss that its zero weight removes.
NEG = -1e9


def dead_columns(
    col_valid: torch.Tensor,
    row_labels: torch.Tensor | None,
    col_labels: torch.Tensor | None,
    targets: torch.Tensor,
    col_start: int,
) -> torch.Tensor:
    """[rows, cols] bool: columns that are no candidate for each row (see the module docstring)."""
    dead = ~col_valid[None, :]
    if row_labels is not None:
        cols = torch.arange(col_start, col_start + col_valid.shape[0], device=col_valid.device)
        same = (row_labels[:, None] == col_labels[None, :]) & (row_labels[:, None] >= 0)
        dead = dead | (same & (cols[None, :] != targets[:, None]))
    return dead


def plain_cross_entropy(rows, cols, scale, col_valid, targets, row_labels=None, col_labels=None):
    """Per-row cross-entropy of scale * rows @ cols.T against `targets` (the reference form)."""
    logits = (scale * rows @ cols.T).masked_fill(dead_columns(col_valid, row_labels, col_labels, targets, 0), NEG)
    return F.cross_entropy(logits, targets, reduction="none")


class TiledCrossEntropy(torch.autograd.Function):
    """The same per-row cross-entropy as `plain_cross_entropy`, with [tile, tile] blocks at a time.

    Forward keeps a running log-sum-exp per row; backward recomputes each block's logits, turns them
    into softmax weights in place and applies them to both sides with two matrix products. The
    temperature's gradient, sum_ij p_ij <r_i, c_j>, is read off the row gradient (sum_i <r_i, (pC)_i>),
    so no third product is needed."""

    @staticmethod
    def block(rows, cols, scale, col_valid, targets, row_labels, col_labels, r0, r1, c0, c1):
        logits = torch.mm(rows[r0:r1], cols[c0:c1].T).mul_(scale)
        if row_labels is not None or not bool(col_valid[c0:c1].all()):
            dead = dead_columns(
                col_valid[c0:c1],
                None if row_labels is None else row_labels[r0:r1],
                None if col_labels is None else col_labels[c0:c1],
                targets[r0:r1],
                c0,
            )
            logits.masked_fill_(dead, NEG)
        return logits

    @staticmethod
    def blocks(rows, cols, scale, col_valid, targets, row_labels, col_labels, tile):
        """(r0, r1, c0, c1, masked logits of that block) for every [tile, tile] block."""
        n, total = rows.shape[0], cols.shape[0]
        for r0 in range(0, n, tile):
            r1 = min(r0 + tile, n)
            for c0 in range(0, total, tile):
                c1 = min(c0 + tile, total)
                yield (
                    r0,
                    r1,
                    c0,
                    c1,
                    TiledCrossEntropy.block(
                        rows, cols, scale, col_valid, targets, row_labels, col_labels, r0, r1, c0, c1
                    ),
                )

    @staticmethod
    def forward(ctx, rows, cols, scale, col_valid, targets, row_labels, col_labels, tile: int):
        lse = torch.full((rows.shape[0],), float("-inf"), device=rows.device, dtype=rows.dtype)
        with torch.no_grad():
            for r0, r1, _, _, logits in TiledCrossEntropy.blocks(
                rows, cols, scale, col_valid, targets, row_labels, col_labels, tile
            ):
                lse[r0:r1] = torch.logaddexp(lse[r0:r1], torch.logsumexp(logits, dim=1))
            positive = scale * (rows * cols[targets]).sum(dim=1)
        ctx.save_for_backward(
            rows, cols, scale, col_valid, targets, lse, *(t for t in (row_labels, col_labels) if t is not None)
        )
        ctx.tile, ctx.labelled = tile, row_labels is not None
        return lse - positive

    @staticmethod
    def backward(ctx, grad_loss):
        rows, cols, scale, col_valid, targets, lse, *labels = ctx.saved_tensors
        row_labels, col_labels = labels if ctx.labelled else (None, None)
        g_rows, g_cols = torch.zeros_like(rows), torch.zeros_like(cols)
        for r0, r1, c0, c1, p in TiledCrossEntropy.blocks(
            rows, cols, scale, col_valid, targets, row_labels, col_labels, ctx.tile
        ):
            # d loss_i / d logit_ij of the log-sum-exp term: softmax_ij, times the row's weight
            p.sub_(lse[r0:r1, None]).exp_().mul_(grad_loss[r0:r1, None])
            g_rows[r0:r1].addmm_(p, cols[c0:c1])
            g_cols[c0:c1].addmm_(p.T, rows[r0:r1])
        # so far g_rows holds sum_j p_ij c_j: the temperature's gradient first, then the scale
        g_scale = (rows * g_rows).sum()
        g_rows.mul_(scale)
        g_cols.mul_(scale)
        # the positive term, -scale * <row_i, col_target(i)>
        partner = cols[targets]
        g_rows -= scale * partner * grad_loss[:, None]
        g_cols.index_add_(0, targets, -scale * rows * grad_loss[:, None])
        g_scale = g_scale - ((rows * partner).sum(dim=1) * grad_loss).sum()
        return g_rows, g_cols, g_scale, None, None, None, None, None


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    valid: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    label_ids: torch.Tensor | None = None,
    tile_size: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows, normalised by the global number of valid rows.

    a, b: [n, d] L2-normalised embeddings of the same n samples on this rank (every rank passes the
    same n); valid: [n] bool, rows that hold both modalities; logit_scale: scalar (exponentiated);
    label_ids: [n] int64 (-1 = no label) to keep same-label samples from being negatives; tile_size:
    0 for the plain form, else the block size of the tiled form. Summed over ranks, the returned
    values equal the loss of one process holding the whole batch.
    """
    # Every rank builds the same graph whatever its masks hold, so the collectives in the backward
    # of the two gathers run in the same order everywhere (no data-dependent branches here).
    all_a, all_b = gather_with_grad(a.float()), gather_with_grad(b.float())
    all_valid = gather_no_grad(valid)
    all_labels = gather_no_grad(label_ids) if label_ids is not None else None
    targets = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
    scale = logit_scale.float()
    if tile_size:
        ce = TiledCrossEntropy.apply(
            a.float(), all_b, scale, all_valid, targets, label_ids, all_labels, tile_size
        ) + TiledCrossEntropy.apply(b.float(), all_a, scale, all_valid, targets, label_ids, all_labels, tile_size)
    else:
        ce = plain_cross_entropy(
            a.float(), all_b, scale, all_valid, targets, label_ids, all_labels
        ) + plain_cross_entropy(b.float(), all_a, scale, all_valid, targets, label_ids, all_labels)
    return (ce * valid).sum() / (2 * all_valid.sum().clamp(min=1))


@dataclass
class InfoNCESettings(LossSettings):
    tile_size: int = 0  # 0: plain [local x global] logits; N: N x N blocks, memory bounded by the tile


@register_loss("infonce")
class InfoNCE(PairLoss):
    """CLIP's symmetric InfoNCE (`loss=infonce`, the default), plain or tiled."""

    settings = InfoNCESettings

    def __init__(self, settings: InfoNCESettings, temperature):
        super().__init__(settings, temperature)
        self.tile_size = settings.tile_size

    def forward(self, a, b, valid, label_ids=None):
        return info_nce(a, b, valid, self.scale(), label_ids=label_ids, tile_size=self.tile_size)
