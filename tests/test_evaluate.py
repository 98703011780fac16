"""Evaluation figures against hand-computed values on tiny fixed sets, including a pair with
missing samples, and the metrics of a real eval run through embed_dataset."""

from __future__ import annotations

import pytest
import torch

from contrastive.evaluate import compute_metrics, format_table, retrieval_metrics, zero_shot_accuracy


def test_retrieval_by_hand():
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    # a->b similarities: row 0 = (1, 0, 0): own match first.  Row 1 = (0, 0, 1): own score 0, one
    # higher (b2), one tie (b0): rank 1 + 1/2 + 1 = 2.5, in the top 1 with probability 0.
    # Row 2 = (0, 1, 0): the same.  R@1 = 1/3, R@2 = (1 + 1/2 + 1/2) / 3, median rank 2.5.
    m = retrieval_metrics(a, b, ks=(1, 2, 3), labels=["x", "y", "y"])
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@3"] == pytest.approx(1.0)
    assert m["median_rank"] == pytest.approx(2.5)
    assert m["label_R@1"] == pytest.approx(1.0)  # rows 1 and 2 retrieve each other: same label


def test_zero_shot_by_hand():
    classes = ["cat", "dog"]
    class_emb = torch.tensor([[1.0, 0], [0, 1.0]])
    emb = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert zero_shot_accuracy(emb, ["cat", "dog", "dog", "cat"], class_emb, classes) == pytest.approx(0.5)


class FixedTextModel:
    """compute_metrics only asks the model for text embeddings of prompts: a fixed table."""

    encoders = {"image": None, "audio": None, "text": None}

    def embed(self, name, prompts):
        table = {"cat": [1.0, 0, 0], "dog": [0, 1.0, 0]}
        return torch.tensor([table[p.split()[-1]] for p in prompts])


def test_metrics_with_a_pair_lacking_samples():
    image = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0.8, 0.6, 0], [0, 1, 0]])
    audio = torch.tensor([[0.6, 0, 0.8], [0, 1, 0], [1, 0, 0], [0, 0, 1]])
    text = torch.tensor([[1.0, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    embedded = {
        "embeddings": {"image": image, "audio": audio, "text": text},
        "mask": {
            "image": torch.tensor([True, True, True, True]),
            "audio": torch.tensor([True, False, True, False]),  # two samples lack audio
            "text": torch.tensor([True, True, True, True]),
        },
        "labels": ["cat", "dog", "cat", "dog"],
    }
    m = compute_metrics(FixedTextModel(), embedded, prompts=["a {label}"], text_modality="text")
    assert m["zero_shot/classes"] == 2
    assert m["zero_shot/image->text/acc"] == 1.0  # rows 0, 2 nearest cat; rows 1, 3 dog
    # only rows 0 and 2 count (both right); counting rows 1 and 3 too would give 3/4
    assert m["zero_shot/audio->text/acc"] == 1.0
    # image-audio over rows 0 and 2 only: image0.audio0 = 0.6 < image0.audio2 = 1 -> rank 2;
    # image2.audio2 = 0.8 > image2.audio0 = 0.48 -> rank 1
    assert m["retrieval/image-audio/n"] == 2
    assert m["retrieval/image->audio/R@1"] == pytest.approx(0.5)
    assert m["retrieval/image->audio/median_rank"] == pytest.approx(1.5)
    assert m["retrieval/image-text/n"] == 4
    assert "image->audio" in format_table(m)


def test_embed_dataset_drops_padding_and_keeps_masks(tmp_path):
    from contrastive.builders import build_objective
    from contrastive.data import ShardDataset, load_sources
    from contrastive.evaluate import embed_dataset

    from datasets import sample, tiny_modalities, write_dataset

    write_dataset(tmp_path, [sample(i, audio=i % 3 != 0) for i in range(11)], shard_size=4)
    mods = tiny_modalities()
    ds = ShardDataset(load_sources(str(tmp_path)), mods, batch_size=4, train=False, num_workers=2)
    torch.manual_seed(0)
    model = build_objective(mods, embed_dim=8).model
    out = embed_dataset(model, ds, device=torch.device("cpu"))
    assert sorted(out["keys"]) == [f"s{i:05d}" for i in range(11)]
    assert out["embeddings"]["image"].shape == (11, 8)
    assert int(out["mask"]["audio"].sum()) == 7
    assert out["labels"][out["keys"].index("s00004")] == "class1"
