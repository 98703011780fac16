"""Contrastive losses over modality pairs, exact across ranks, in a registry keyed by name (see
base.py for the contract): InfoNCE (plain and tiled) and SigLIP ship here."""

from contrastive.loss.base import LOSSES, LossSettings, PairLoss, Temperature, register_loss
from contrastive.loss.infonce import InfoNCE, InfoNCESettings, info_nce
from contrastive.loss.module import ContrastiveLoss, loss_settings
from contrastive.loss.pairs import Pair, pair_name, resolve_pairs
from contrastive.loss.siglip import SigLIP, SigLIPSettings, sigmoid_loss

__all__ = [
    "LOSSES",
    "ContrastiveLoss",
    "InfoNCE",
    "InfoNCESettings",
    "LossSettings",
    "Pair",
    "PairLoss",
    "SigLIP",
    "SigLIPSettings",
    "Temperature",
    "info_nce",
    "loss_settings",
    "pair_name",
    "register_loss",
    "resolve_pairs",
    "sigmoid_loss",
]
