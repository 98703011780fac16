"""Every shipped config composes and instantiates; typos fail with the key's name."""

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from contrastive.builders import build_loss, build_modalities, build_objective, build_optimizer
from contrastive.config import validate
from contrastive.loss import LOSSES
from contrastive.modalities import ConfigError

from conftest import CONFIG_DIR, compose

# Config groups: the directories of YAML files, and the registered losses (their settings dataclasses).
GROUPS = sorted([p.name for p in CONFIG_DIR.iterdir() if p.is_dir()] + ["loss"])


def options(group):
    if group == "loss":
        return sorted(LOSSES)
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def test_every_yaml_opens_with_its_command():
    for path in CONFIG_DIR.rglob("*.yaml"):
        lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("# @package")]
        assert lines[0].startswith("# contrastive-"), f"{path} should open with the command that uses it"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_builds(group):
    for option in options(group):
        cfg = compose(f"{group}={option}")
        validate(cfg)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        modalities = build_modalities(cfg.modalities, OmegaConf.to_container(cfg.modality))
        with torch.device("meta"):  # builds every tower at its configured size without allocating it
            loss = build_loss(list(modalities), OmegaConf.to_object(cfg.loss))
            objective = build_objective(modalities, embed_dim=cfg.model.embed_dim, loss=loss)
        optimizer, scheduler = build_optimizer(
            torch.nn.Linear(2, 2),
            optimizer=instantiate(cfg.optim.optimizer),
            scheduler=instantiate(cfg.optim.scheduler),
            total_steps=cfg.trainer.max_steps,
        )
        assert set(objective.model.encoders) == set(cfg.modalities)
        assert optimizer.param_groups[0]["weight_decay"] == cfg.optim.optimizer.weight_decay


def test_modality_and_pair_choice_from_the_command_line():
    cfg = compose("modalities=[image,text]", "loss.temperature.init=0.05", "loss.temperature.learnable=false")
    modalities = build_modalities(cfg.modalities, OmegaConf.to_container(cfg.modality))
    with torch.device("meta"):
        loss = build_loss(list(modalities), OmegaConf.to_object(cfg.loss))
        objective = build_objective(modalities, embed_dim=16, loss=loss)
    assert list(objective.model.encoders) == ["image", "text"]
    assert objective.loss.pairs == [("image", "text")]
    assert not objective.loss.losses["image-text"].logit_scale.requires_grad


def test_misspelt_key_on_the_command_line_names_it():
    with pytest.raises(ConfigCompositionException) as err:
        compose("trainer.max_step=3")
    assert "max_step" in str(err.value) or "max_step" in str(err.value.__cause__)


def test_new_key_is_checked_against_the_schema():
    cfg = compose("+trainer.max_stpes=3")  # `+` adds keys past Hydra's struct check...
    with pytest.raises(Exception, match="max_stpes"):  # ...so the trainer validates before anything runs
        validate(cfg)


def test_misspelt_yaml_key_names_it(tmp_path: Path):
    exp = tmp_path / "experiment"
    exp.mkdir()
    (exp / "typo.yaml").write_text(
        "# @package _global_\n# contrastive-train experiment=typo\ntrainer:\n  max_stesp: 3\n"
    )
    with pytest.raises(Exception) as err:
        compose("experiment=typo", f"hydra.searchpath=[file://{tmp_path}]")
    assert "max_stesp" in str(err.value) + str(err.value.__cause__)


def test_misspelt_modality_field_names_it():
    cfg = compose("+modality.image.widht=64")
    with pytest.raises(ConfigError, match="widht"):
        build_modalities(cfg.modalities, OmegaConf.to_container(cfg.modality))


def test_per_pair_settings_from_the_command_line():
    cfg = compose(
        "loss.pairs=anchor:image",
        "+loss.weights.image-audio=0.5",
        "+loss.temperatures.image-text={init: 0.05, learnable: false}",
        "loss.tile_size=256",
    )
    loss = build_loss(list(cfg.modalities), OmegaConf.to_object(cfg.loss))
    assert loss.pairs == [("image", "audio"), ("image", "text")]
    assert loss.weights == {"image-audio": 0.5, "image-text": 1.0}
    assert loss.scales()["image-text"].item() == pytest.approx(20.0)
    assert (
        not loss.losses["image-text"].logit_scale.requires_grad and loss.losses["image-audio"].logit_scale.requires_grad
    )
    assert loss.losses["image-text"].tile_size == 256
    cfg = compose("+loss.temperatures.image-text={max_logit: 5}")
    with pytest.raises(ConfigError, match=r"loss.temperatures.image-text: unknown key\(s\) \['max_logit'\]"):
        build_loss(list(cfg.modalities), OmegaConf.to_object(cfg.loss))
