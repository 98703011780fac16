"""DeepSpeed through the real CLI: 2 gloo ranks with ZeRO 0, 2 and 3, under torchrun and under the
deepspeed launcher, give the losses of one process trained on the same global batches; ZeRO-3's
export (consolidated from partitions) equals ZeRO-0's; bf16 trains."""

from __future__ import annotations

import pytest
import torch
from ports import free_port
from safetensors.torch import load_file

from contrastive.data.sources import iter_tar_samples

from conftest import read_jsonl, run_cli, script, tiny_overrides
from datasets import write_dataset

STEPS = 4
PER_RANK = 8


def two_ranks(launcher: str, demo, run_dir, *extra):
    args = tiny_overrides(
        demo,
        run_dir,
        f"trainer.max_steps={STEPS}",
        f"data.batch_size={PER_RANK}",
        "trainer.record_keys=true",
        "trainer.log_every=1",
        "data.eval=null",
        *extra,
    )
    train = script("contrastive-train")
    if launcher == "torchrun":
        return run_cli("torchrun", "--standalone", "--nproc_per_node", "2", *train, *args)
    return run_cli("deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *train, *args)


def losses(run_dir):
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl") if "loss" in row]


@pytest.fixture(scope="module")
def single_process(demo_data, tmp_path_factory):
    """One process trained on exactly the global batches a 2-rank run sees: the keys each rank
    recorded, step by step, rank 0's rows then rank 1's, replayed from a shard in that order."""
    tmp = tmp_path_factory.mktemp("ds")
    reference = tmp / "two_ranks"
    two_ranks("torchrun", demo_data, reference, "engine.zero_stage=0", "export=true")
    keys = [[row["keys"] for row in read_jsonl(reference / "keys" / f"rank{r}.jsonl")] for r in range(2)]
    samples = {
        s["__key__"]: s for shard in sorted((demo_data / "train").glob("*.tar")) for s in iter_tar_samples(str(shard))
    }
    ordered = [samples[k] for step in range(STEPS) for r in range(2) for k in keys[r][step]]
    assert len(ordered) == STEPS * 2 * PER_RANK  # full batches: no padding, no empty sample
    replay = write_dataset(
        tmp / "replay", [{k: v for k, v in s.items() if k != "__shard__"} for s in ordered], shard_size=10_000
    )
    single = tmp / "single"
    run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            single,
            f"data.train={replay}",
            "data.eval=null",
            f"trainer.max_steps={STEPS}",
            f"data.batch_size={2 * PER_RANK}",
            "data.shuffle_buffer=0",
            "trainer.log_every=1",
            "export=false",
        ),
    )
    return losses(single), reference


# Tolerance: the two runs compute the same sums in another order (a per-rank partial sum, then the
# all-reduce across ranks, versus one sum over the whole batch), so fp32 rounding differs in the
# last bits (~1e-7 relative) and Adam carries that through later steps; 1e-4 absolute on losses
# near 9 is ~1e-5 relative, far below what a wrong gradient (or a wrong normalisation) would give.
@pytest.mark.parametrize(
    "launcher,zero",
    # each launcher and each ZeRO stage once (ZeRO-2 under torchrun: tests/test_elastic_resume.py)
    [("torchrun", 0), ("deepspeed", 2), ("torchrun", 3)],
)
def test_two_ranks_match_one_process(single_process, demo_data, tmp_path, launcher, zero):
    expected, reference = single_process
    run_dir = tmp_path / "run"
    if (launcher, zero) == ("torchrun", 0):
        run_dir = reference  # the run the replay was built from
    else:
        two_ranks(launcher, demo_data, run_dir, f"engine.zero_stage={zero}", f"export={zero == 3}")
    assert losses(run_dir) == pytest.approx(expected, abs=1e-4)
    if zero == 3:  # the export gathers ZeRO-3's partitions into the same weights ZeRO-0 holds whole
        ours, ref = (
            load_file(str(run_dir / "export/model.safetensors")),
            load_file(str(reference / "export/model.safetensors")),
        )
        assert ours.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(ours[k], ref[k], atol=1e-4), k


@pytest.mark.parametrize("precision,zero", [("bf16", 0), ("bf16", 2), ("amp_bf16", 0)])
def test_bf16_trains(demo_data, tmp_path, precision, zero):
    run_dir = tmp_path / "run"
    run_cli(
        "contrastive-train",
        *tiny_overrides(
            demo_data,
            run_dir,
            f"trainer.precision={precision}",
            f"engine.zero_stage={zero}",
            "trainer.max_steps=6",
            "trainer.log_every=1",
            "data.eval=null",
        ),
    )
    got = losses(run_dir)
    assert len(got) == 6 and all(torch.isfinite(torch.tensor(got))) and got[-1] < got[0]
    weights = load_file(str(run_dir / "export/model.safetensors"))
    assert all(v.dtype == torch.float32 for v in weights.values())


def _engine_losses(attention: str, precision: str, dtypes: bool = False):
    """Three steps of a DeepSpeed engine with these attention kernels (in a process group of one)."""
    from contrastive.builders import build_objective, build_optimizer
    from contrastive.engine import Engine, deepspeed_config

    from datasets import tiny_modalities

    torch.manual_seed(0)
    objective = build_objective(tiny_modalities(("image", "text")), embed_dim=16)
    opt, _ = build_optimizer(
        objective, optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3), scheduler=None, total_steps=10
    )
    engine = Engine(
        objective,
        opt,
        None,
        deepspeed_config(micro_batch_size=4, world_size=1, precision=precision),
        attention=attention,
    )
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": torch.randint(1, 100, (4, 16)),
        "mask": {"image": torch.ones(4, dtype=torch.bool), "text": torch.ones(4, dtype=torch.bool)},
    }
    out = []
    for _ in range(3):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()
        out.append(float(loss.detach()))
    return (out, {p.dtype for p in objective.parameters()}) if dtypes else out


def _first_update(precision: str) -> tuple[set, float]:
    """One optimizer step of a fresh engine: AdamW's step counts, and its update over the lr."""
    from contrastive.builders import build_objective, build_optimizer
    from contrastive.engine import Engine, deepspeed_config

    from datasets import tiny_modalities

    torch.manual_seed(0)
    objective = build_objective(tiny_modalities(("image", "text")), embed_dim=16)
    lr = 1e-3
    opt, _ = build_optimizer(
        objective,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=lr, weight_decay=0.0),
        scheduler=None,
        total_steps=10,
    )
    engine = Engine(objective, opt, None, deepspeed_config(micro_batch_size=4, world_size=1, precision=precision))
    # The tensors the optimizer updates: the weights in fp32, DeepSpeed's fp32 masters in bf16.
    masters = [p for group in opt.param_groups for p in group["params"]]
    before = [p.detach().clone() for p in masters]
    batch = {
        "image": torch.randn(4, 3, 32, 32),
        "text": torch.randint(1, 100, (4, 16)),
        "mask": {"image": torch.ones(4, dtype=torch.bool), "text": torch.ones(4, dtype=torch.bool)},
    }
    loss, _ = engine(batch)
    engine.backward(loss)
    engine.step()
    moved = torch.cat([(p.detach() - b).abs().flatten() for p, b in zip(masters, before)])
    return {int(opt.state[p]["step"]) for p in masters}, float(moved[moved > 0].median() / lr)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_first_update_is_adams_first_step(precision):
    """DeepSpeed's bf16 wrapper at stage 0 stepped the optimizer once on zero gradients while it set
    up: AdamW's bias corrections then ran a step late (the first update was 0.74x the lr)."""
    from dist_utils import run_ranks

    ((steps, update_over_lr),) = run_ranks(1, _first_update, precision)
    assert steps == {1}
    assert update_over_lr == pytest.approx(1.0, abs=0.01)  # Adam's first step moves each weight by lr


def _kernel_runs() -> dict:
    """_engine_losses for each (attention, precision) of the test below; a failure's message."""
    runs: dict = {}
    for attention, precision in (
        ("math", "fp32"),
        ("flash", "fp32"),
        ("efficient", "fp32"),
        ("auto", "bf16"),
        ("math", "bf16"),
    ):
        try:
            runs[attention, precision] = _engine_losses(attention, precision)
        except RuntimeError as e:
            runs[attention, precision] = str(e)
    runs["auto", "amp_bf16"] = _engine_losses("auto", "amp_bf16", True)
    return runs


def test_attention_kernels_are_chosen_by_config():
    from torch.nn.attention import SDPBackend

    from contrastive.engine import attention_backends

    from dist_utils import run_ranks

    assert attention_backends("auto", "cpu", "bf16") == [SDPBackend.MATH]
    assert attention_backends("auto", "cpu", "fp32") is None and attention_backends("auto", "cuda", "bf16") is None
    with pytest.raises(ValueError, match="trainer.attention"):
        attention_backends("fast", "cpu", "fp32")
    # The kernels really are the ones asked for, every engine in one process (one start-up).
    (runs,) = run_ranks(1, _kernel_runs)
    # the same numbers from math and flash; the memory-efficient kernel has no CPU implementation
    assert runs["math", "fp32"] == pytest.approx(runs["flash", "fp32"], abs=1e-5)
    assert "No viable backend for scaled_dot_product_attention" in runs["efficient", "fp32"]
    # amp_bf16: the matmuls run in bf16 under autocast (other numbers than fp32, close to them)
    # over weights that stay fp32.
    amp_losses, amp_dtypes = runs["auto", "amp_bf16"]
    assert amp_dtypes == {torch.float32}
    assert amp_losses != runs["math", "fp32"] and amp_losses == pytest.approx(runs["math", "fp32"], abs=0.05)
    # bf16 on CPU: auto is the math kernel, bit for bit.
    auto_bf16, math_bf16 = runs["auto", "bf16"], runs["math", "bf16"]
    assert auto_bf16 == math_bf16 and all(torch.isfinite(torch.tensor(auto_bf16)))


def _steps_read_back(precision: str, stage: int, fused: bool) -> dict:
    """Host reads (contrastive.syncs) of an ordinary step and of a poisoned one, and what the poisoned
    step changed: a step's verdict is decided on the device wherever the optimizer can skip there."""
    from contrastive.builders import build_objective, build_optimizer
    from contrastive.engine import APPLIED, BAD_GRADIENT, BAD_LOSS, Engine, EngineConfig, deepspeed_config
    from contrastive.syncs import HostReads

    from datasets import tiny_modalities

    torch.manual_seed(0)
    objective = build_objective(tiny_modalities(("image", "text")), embed_dim=16)
    opt, _ = build_optimizer(
        objective, optimizer=lambda g: torch.optim.AdamW(g, lr=1e-3, fused=fused), scheduler=None, total_steps=10
    )
    config = deepspeed_config(  # clipping on: its norm and scale must stay on the device too
        EngineConfig(zero_stage=stage), micro_batch_size=4, world_size=1, precision=precision, grad_clip=1.0
    )
    engine = Engine(objective, opt, None, config)
    ones = torch.ones(4, dtype=torch.bool)

    def batch(image=None):
        return {
            "image": torch.randn(4, 3, 32, 32) if image is None else image,
            "text": torch.randint(1, 100, (4, 16)),
            "mask": {"image": ones.clone(), "text": ones.clone()},
        }

    engine.train_step([batch()])  # the optimizer's states exist from here on
    with HostReads() as ordinary:
        _, status = engine.train_step([batch()])
    weights = [p.detach().clone() for p in objective.parameters()]
    steps = {int(s["step"]) for s in opt.state.values() if "step" in s}
    _, poisoned = engine.train_step([batch(torch.full((4, 3, 32, 32), float("nan")))])
    unchanged = all(torch.equal(w, p.detach()) for w, p in zip(weights, objective.parameters()))
    return {
        "reads": ordinary.count,
        "status": int(status),
        "poisoned": int(poisoned),
        "unchanged": unchanged,
        "steps": (steps, {int(s["step"]) for s in opt.state.values() if "step" in s}),
        "codes": (APPLIED, BAD_GRADIENT, BAD_LOSS),
    }


def _both_optimizers(precision: str) -> list[dict]:
    return [_steps_read_back(precision, 0, fused) for fused in (True, False)]


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_an_ordinary_step_reads_nothing_back_and_a_nonfinite_one_changes_nothing(precision):
    from dist_utils import run_ranks

    ((device, host),) = run_ranks(1, _both_optimizers, precision)
    applied, _, bad_loss = device["codes"]
    assert device["reads"] == 0 and device["status"] == applied  # fused AdamW skips by a device flag
    # another optimizer: the host decides (one read a step; torch's unfused AdamW reads its step
    # counts too, which a GPU run keeps on the host)
    assert host["reads"] >= 1
    for run in (device, host):
        assert run["poisoned"] == bad_loss and run["unchanged"], run
        assert run["steps"] == ({2}, {2}), run  # no moment nor step count moved
