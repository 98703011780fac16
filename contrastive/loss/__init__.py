"""Contrastive losses over modality pairs, exact across ranks: InfoNCE (plain and tiled) and SigLIP."""

from contrastive.loss.infonce import info_nce
from contrastive.loss.module import KINDS, ContrastiveLoss, Temperature
from contrastive.loss.pairs import Pair, pair_name, resolve_pairs
from contrastive.loss.siglip import sigmoid_loss

__all__ = ["KINDS", "ContrastiveLoss", "Pair", "Temperature", "info_nce", "pair_name", "resolve_pairs", "sigmoid_loss"]
