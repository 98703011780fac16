"""A bug in a modality's code is a crash with its own traceback at the first batch, not bad data
counted until the run dies thousands of samples later. Corrupt bytes stay bad data (see
test_data_bad_input.py), and a modality class that leaves out part of the contract cannot be built."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from contrastive.data.decode import BatchDecoder
from contrastive.modalities import Modality, ModalityError, register_modality
from contrastive.modalities.text import Text

from conftest import REPO, run_cli, tiny_overrides
from datasets import sample, tiny_modalities


@register_modality("buggy_caption")
@dataclass
class BuggyCaption(Text):
    """Captions, with a bug in preprocess: a newcomer's modality."""

    def preprocess(self, value: str, *, train: bool) -> torch.Tensor:
        return self.tokenizer([value])[0] + value  # TypeError on every sample


def test_a_modality_that_never_succeeds_stops_the_run_at_the_first_batch(demo_data, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            run_dir,
            "imports=[test_broken_modality]",
            "modalities=[image,buggy_caption]",
            "+modality.buggy_caption={context_length: 16, width: 64, layers: 2, heads: 2}",
            "data.num_workers=2",
            "data.eval=null",
        ),
        env={"PYTHONPATH": str(REPO / "tests")},
        check=False,
    )
    assert proc.returncode != 0
    err = proc.stderr
    assert "ModalityError" in err and "the buggy_caption modality (test_broken_modality.BuggyCaption)" in err, err[
        -3000:
    ]
    # its own traceback: the line of the bug, in the test file
    assert "test_broken_modality.py" in err and "in preprocess" in err and "TypeError" in err
    assert "max_bad_fraction" not in err  # not reported as bad data
    assert not (run_dir / "metrics.jsonl").exists()  # no step was trained


def test_corrupt_bytes_before_good_ones_are_still_bad_data():
    mods = tiny_modalities(("image", "text"))
    decoder = BatchDecoder(mods, train=False)
    slots = [sample(i) for i in range(6)]
    for i in (0, 1, 2, 3):  # the first four images corrupt, then good ones in the same batch
        slots[i]["png"] = b"\x89PNG\r\n\x1a\nbroken"
    batch = decoder(
        [
            {
                "__shard__": "s",
                **{k: v if not isinstance(v, str) else v.encode() for k, v in s.items() if k not in ("json", "flac")},
            }
            for s in slots
        ]
    )
    assert batch["counts"]["bad/image"] == 4 and batch["mask"]["image"].tolist() == [False] * 4 + [True] * 2


def test_corrupt_bytes_alone_in_a_batch_raise_with_the_way_out():
    decoder = BatchDecoder(tiny_modalities(("image", "text")), train=False)
    slots = [{"__key__": f"k{i}", "__shard__": "s", "png": b"not a png", "txt": b"a caption"} for i in range(3)]
    with pytest.raises(ModalityError, match="contrastive-data verify"):
        decoder(slots)


def test_a_modality_must_implement_the_contract():
    @dataclass
    class Half(Modality):
        extensions = ("half",)

        def decode(self, data, extension):
            return data

    with pytest.raises(TypeError, match="abstract"):
        Half()
