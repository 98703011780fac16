"""Evaluation figures against hand-computed values on tiny fixed sets: retrieval with several captions
per image (in both layouts: captions as lines of one sample, or as samples sharing a group), ties,
a pair with missing samples, zero-shot top-1/top-5/mean per-class recall, the linear probe; and the
embeddings of a real eval run (several captions, groups, two loader workers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive.evaluation import format_table, retrieval_metrics, zero_shot_metrics
from contrastive.evaluation.probe import linear_probe
from contrastive.evaluation.retrieval import group_recall
from contrastive.evaluation.zeroshot import classification_metrics

# Seven images, e0..e6, and ten captions, each a unit vector: {component: value}. Scores are the
# components, so ranks can be read off by hand (see the test).
CAPTIONS = [  # (image, components)
    (0, {0: 1.0}),
    (0, {0: 0.6, 1: 0.8}),
    (1, {1: 0.6, 2: 0.8}),
    (1, {1: 0.8, 3: 0.6}),
    (2, {2: 0.6, 0: 0.8}),
    (3, {3: 1.0}),
    (4, {4: 0.6, 5: 0.8}),
    (5, {5: 0.6, 4: 0.8}),
    (6, {6: 0.8, 2: 0.6}),
    (6, {0: 0.4, 1: 0.4, 2: 0.4, 3: 0.4, 4: 0.4, 5: 0.4, 6: 0.2}),
]
EXPECTED = {
    # text->image, a caption's rank of its image: 1 2 2 1 2 1 2 2 1 7
    "text->image": {"R@1": 4 / 10, "R@5": 9 / 10, "R@10": 1.0, "median_rank": 2.0},
    # image->text, the rank of the best of an image's captions: I0 1; I1 1.5 (a tie with I0's c1 at
    # 0.8: top-1 with probability 1/2); I2 2.5 (c2 above, c8 tied); I3 1; I4 2; I5 2; I6 1
    "image->text": {"R@1": 3.5 / 7, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.5},
}


def caption_vector(components: dict[int, float]) -> torch.Tensor:
    v = torch.zeros(7)
    for i, x in components.items():
        v[i] = x
    return v


def one_sample_per_image() -> dict:
    """CLIP_benchmark's layout: a sample per image, its captions one a line (the first in the row, the
    others as further inputs)."""
    images, texts, extra, extra_rows = torch.eye(7), [], [], []
    for image in range(7):
        mine = [caption_vector(c) for owner, c in CAPTIONS if owner == image]
        texts.append(mine[0])
        extra += mine[1:]
        extra_rows += [image] * (len(mine) - 1)
    return {
        "embeddings": {"image": images, "text": torch.stack(texts)},
        "mask": {"image": torch.ones(7, dtype=torch.bool), "text": torch.ones(7, dtype=torch.bool)},
        "keys": [f"img{i}" for i in range(7)],
        "labels": [None] * 7,
        "groups": [None] * 7,
        "extra": {"text": {"embeddings": torch.stack(extra), "rows": torch.tensor(extra_rows)}},
    }


def one_sample_per_caption() -> dict:
    """COCO stored flat: a sample per caption, the image repeated, `json.group` naming the image."""
    owners = [owner for owner, _ in CAPTIONS]
    return {
        "embeddings": {"image": torch.eye(7)[owners], "text": torch.stack([caption_vector(c) for _, c in CAPTIONS])},
        "mask": {"image": torch.ones(10, dtype=torch.bool), "text": torch.ones(10, dtype=torch.bool)},
        "keys": [f"cap{i}" for i in range(10)],
        "labels": [None] * 10,
        "groups": [f"img{o}" for o in owners],
        "extra": {},
    }


@pytest.mark.parametrize("layout", [one_sample_per_image, one_sample_per_caption])
def test_retrieval_with_several_captions_per_image_by_hand(layout):
    m = retrieval_metrics(layout(), text_modality="text")
    assert m["retrieval/image-text/n"] == 7 and m["retrieval/image-text/captions"] == 10
    for direction, expected in EXPECTED.items():
        for k, v in expected.items():
            assert m[f"retrieval/{direction}/{k}"] == pytest.approx(v), (direction, k)


def test_one_to_one_retrieval_with_ties_by_hand():
    a = torch.eye(3)
    b = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])
    # a->b similarities: row 0 = (1, 0, 0): own match first.  Row 1 = (0, 0, 1): own score 0, one
    # higher (b2), one tie (b0): rank 1 + 1/2 + 1 = 2.5, in the top 1 with probability 0.
    # Row 2 = (0, 1, 0): the same.  R@1 = 1/3, R@2 = (1 + 1/2 + 1/2) / 3, median rank 2.5.
    groups = torch.arange(3)
    m = group_recall(a, groups, b, groups, ks=(1, 2, 3), query_labels=["x", "y", "y"], candidate_labels=["x", "y", "y"])
    assert m["R@1"] == pytest.approx(1 / 3)
    assert m["R@2"] == pytest.approx(2 / 3)
    assert m["R@3"] == pytest.approx(1.0)
    assert m["median_rank"] == pytest.approx(2.5)
    assert m["label_R@1"] == pytest.approx(1.0)  # rows 1 and 2 retrieve each other: same label


def test_classification_metrics_by_hand():
    # 6 samples, 5 classes. Predictions (argmax): 0 0 1 3 4 0; targets 0 1 1 2 4 4.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0],
            [0.5, 0.4, 0.3, 0.2, 0.1],  # target 1 second
            [0.1, 0.8, 0.0, 0.0, 0.0],
            [0.0, 0.1, 0.2, 0.9, 0.3],  # target 2 third
            [0.0, 0.0, 0.0, 0.1, 0.7],
            [0.6, 0.5, 0.4, 0.3, 0.2],  # target 4 fifth
        ]
    )
    m = classification_metrics(scores, torch.tensor([0, 1, 1, 2, 4, 4]))
    assert m["acc"] == pytest.approx(3 / 6)
    assert m["top5"] == pytest.approx(1.0)
    # recall per class present: class 0 1/1, class 1 1/2, class 2 0/1, class 4 1/2 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)


class FixedTextModel:
    """zero-shot only asks the model for text embeddings of prompts: a fixed table."""

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
        "keys": ["a", "b", "c", "d"],
        "labels": ["cat", "dog", "cat", "dog"],
        "groups": [None] * 4,
        "extra": {},
    }
    m = zero_shot_metrics(FixedTextModel(), embedded, templates=["a {label}"], text_modality="text")
    m.update(retrieval_metrics(embedded, text_modality="text"))
    assert m["zero_shot/classes"] == 2
    assert m["zero_shot/image->text/acc"] == 1.0  # rows 0, 2 nearest cat; rows 1, 3 dog
    # only rows 0 and 2 count (both right); counting rows 1 and 3 too would give 3/4
    assert m["zero_shot/audio->text/acc"] == 1.0 and "zero_shot/audio->text/top5" not in m  # 2 classes
    # image-audio over rows 0 and 2 only: image0.audio0 = 0.6 < image0.audio2 = 1 -> rank 2;
    # image2.audio2 = 0.8 > image2.audio0 = 0.48 -> rank 1
    assert m["retrieval/image-audio/n"] == 2
    assert m["retrieval/image->audio/R@1"] == pytest.approx(0.5)
    assert m["retrieval/image->audio/median_rank"] == pytest.approx(1.5)
    assert m["retrieval/image-text/n"] == 4
    table = format_table(m)
    assert "image->audio" in table and "zero-shot classification (2 classes" in table
    named = format_table({f"coco/{k}": v for k, v in m.items()} | m)
    assert "== eval set coco ==" in named


def test_class_indices_name_classes_from_a_file():
    embedded = {
        "embeddings": {"image": torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]), "text": torch.zeros(2, 3)},
        "mask": {"image": torch.ones(2, dtype=torch.bool), "text": torch.zeros(2, dtype=torch.bool)},
        "keys": ["a", "b"],
        "labels": ["1", "0"],
        "groups": [None, None],
        "extra": {},
    }
    # classnames.txt: dog, cat. Image 0 is nearest "cat", class 1, and its `cls` is 1; image 1 "dog", 0.
    m = zero_shot_metrics(FixedTextModel(), embedded, templates=["a photo of a {c}"], classnames=["dog", "cat"])
    assert m["zero_shot/image->text/acc"] == 1.0 and m["zero_shot/classes"] == 2
    embedded["labels"] = ["0", "1"]
    m = zero_shot_metrics(FixedTextModel(), embedded, templates=["a {c}"], classnames=["dog", "cat"])
    assert m["zero_shot/image->text/acc"] == 0.0


def test_linear_probe_picks_a_regularisation_and_scores_the_test_split():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8)) * 3
    train_y, test_y = rng.integers(0, 3, 150), rng.integers(0, 3, 60)
    train_x = centres[train_y] + rng.normal(size=(150, 8))
    test_x = centres[test_y] + rng.normal(size=(60, 8))
    m = linear_probe(train_x, train_y, test_x, test_y, cs=[1e-4, 1.0], seed=0)
    assert m["C"] == 1.0 and m["acc"] > 0.9 and m["mean_per_class_recall"] > 0.9


def test_embeddings_of_a_real_eval_run_keep_captions_groups_and_masks(tmp_path):
    from contrastive.builders import build_objective
    from contrastive.data import ShardDataset, load_sources
    from contrastive.evaluation import embed_dataset

    from datasets import sample, tiny_modalities, write_dataset

    samples = [sample(i, audio=i % 3 != 0) for i in range(11)]
    for i in (2, 7):  # three captions in one sample, one a line
        samples[i]["txt"] = f"sample number {i}\nanother caption {i}\n\nthird caption {i}"
    samples[4]["json"] = {"label": "class1", "group": "g"}
    samples[5]["json"] = {"label": "class2", "group": "g"}
    write_dataset(tmp_path, samples, shard_size=4)
    mods = tiny_modalities()
    ds = ShardDataset(load_sources(str(tmp_path)), mods, batch_size=4, train=False, num_workers=2)
    torch.manual_seed(0)
    model = build_objective(mods, embed_dim=8).model
    out = embed_dataset(model, ds, device=torch.device("cpu"))
    assert sorted(out["keys"]) == [f"s{i:05d}" for i in range(11)]
    assert out["embeddings"]["image"].shape == (11, 8)
    assert int(out["mask"]["audio"].sum()) == 7
    assert out["labels"][out["keys"].index("s00004")] == "class1"
    assert out["groups"][out["keys"].index("s00005")] == "g" and out["groups"][out["keys"].index("s00006")] is None
    extra = out["extra"]["text"]
    assert sorted(out["keys"][r] for r in extra["rows"].tolist()) == ["s00002", "s00002", "s00007", "s00007"]
    row = out["keys"].index("s00007")
    expected = model.embed("text", ["sample number 7", "another caption 7", "third caption 7"])
    assert torch.allclose(out["embeddings"]["text"][row], expected[0], atol=1e-6)
    assert torch.allclose(extra["embeddings"][extra["rows"] == row], expected[1:], atol=1e-6)
