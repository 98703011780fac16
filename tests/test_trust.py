"""What a run reads from places it does not control is checked before it is followed: a `latest`
pointer (local or in a bucket) names a checkpoint tag or nothing, and a third party's weights file
is read with torch's weights_only (a pickle that could run code is refused, named)."""

from __future__ import annotations

import argparse

import pytest
import torch

from contrastive.checkpoint import RemoteCheckpoints, latest_checkpoint
from contrastive.modalities import ConfigError
from contrastive.towers import init_tower

from datasets import tiny_modalities


@pytest.mark.parametrize("pointer", ["../..", "../../etc", "/tmp", "step_1", "step_00000001/../../x"])
def test_a_latest_pointer_that_is_no_tag_is_not_followed(tmp_path, pointer):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="no checkpoint tag"):
        latest_checkpoint(tmp_path / "run")
    (tmp_path / "bucket").mkdir()
    (tmp_path / "bucket" / "latest").write_text(pointer + "\n")
    with pytest.raises(ValueError, match="no checkpoint tag"):
        RemoteCheckpoints(f"file://{tmp_path / 'bucket'}").latest_tag()


def test_a_weights_file_holding_objects_is_refused_and_a_plain_one_loads(tmp_path):
    modality = tiny_modalities(("image", "text"))["image"]
    encoder = modality.build_encoder(16)
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pt")
    with pytest.raises(ConfigError, match="pickled.pt holds more than tensors"):
        init_tower("image", encoder, modality, tmp_path / "pickled.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "plain.pt")
    init_tower("image", modality.build_encoder(16), modality, tmp_path / "plain.pt")
