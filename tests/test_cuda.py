"""The GPU path: what only a CUDA device can show. Skipped without one (with the reason); on a lent GPU
`benchmarks/gpu/check.sh` runs them first.

Multi-rank NCCL: two ranks cannot share one GPU (NCCL refuses), so these run one NCCL rank; the
collectives' logic is the same code the gloo tests run with 2 and 4 ranks (test_distributed_loss,
test_deepspeed), and several ranks on several GPUs take a machine that has them.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_ranks

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (benchmarks/gpu/check.sh)"),
]


def _objective(seed: int = 0):
    from contrastive.builders import build_objective

    from datasets import tiny_modalities

    torch.manual_seed(seed)
    return build_objective(tiny_modalities(("image", "text")), embed_dim=16)


def _batch(device: str, n: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.randn(n, 3, 32, 32, generator=g),
        "text": torch.randint(1, 1000, (n, 16), generator=g),
        "mask": {"image": torch.ones(n, dtype=torch.bool), "text": torch.ones(n, dtype=torch.bool)},
    }
    return {
        k: v.to(device) if torch.is_tensor(v) else {m: t.to(device) for m, t in v.items()} for k, v in batch.items()
    }


def _engine(objective, precision: str, zero_stage: int, optimizer=None):
    from contrastive.engine import Engine, EngineConfig, deepspeed_config

    opt = optimizer or torch.optim.AdamW(objective.parameters(), lr=1e-3)
    # plain SGD shows the gradients themselves; ZeRO asks to be told it is fine
    settings = EngineConfig(zero_stage=zero_stage, config={"zero_allow_untested_optimizer": True})
    return Engine(
        objective, opt, None, deepspeed_config(settings, micro_batch_size=8, world_size=1, precision=precision)
    )


def _nccl_group() -> dict:
    import torch.distributed as dist

    from contrastive.distributed import gather_with_grad

    x = torch.arange(4.0, device="cuda", requires_grad=True)
    y = gather_with_grad(x)
    total = torch.ones(1, device="cuda")
    dist.all_reduce(total)
    return {"backend": dist.get_backend(), "device": str(x.device), "gathered": y.sum().item(), "sum": total.item()}


def test_an_nccl_process_group():
    (result,) = run_ranks(1, _nccl_group, device="cuda")
    assert result == {"backend": "nccl", "device": "cuda:0", "gathered": 6.0, "sum": 1.0}


def _one_sgd_step(device: str, precision: str, zero_stage: int) -> tuple[float, torch.Tensor]:
    """The loss and the update of one SGD step (the gradient, clipped, times the lr), read off the fp32
    weights: DeepSpeed's fp32 masters under bf16 (the bf16 copies round the update away)."""
    from deepspeed.utils import safe_get_full_fp32_param

    objective = _objective().to(device)
    params = list(objective.parameters())
    engine = _engine(objective, precision, zero_stage, torch.optim.SGD(params, lr=0.1))

    def weights() -> torch.Tensor:
        masters = [safe_get_full_fp32_param(p) if precision != "fp32" else p for p in params]
        return torch.cat([m.detach().float().flatten().cpu() for m in masters])

    before = weights()
    loss, logs = engine(_batch(device))
    engine.backward(loss)
    engine.step()
    after = weights()
    return float(sum(v for k, v in logs.items() if k.startswith("loss/"))), after - before


def test_a_zero2_bf16_step_on_the_gpu_matches_the_cpu_fp32_step():
    ((cpu_loss, cpu_update),) = run_ranks(1, _one_sgd_step, "cpu", "fp32", 0)
    ((gpu_loss, gpu_update),) = run_ranks(1, _one_sgd_step, "cuda", "bf16", 2, device="cuda")
    assert gpu_loss == pytest.approx(cpu_loss, rel=2e-2)
    cosine = torch.nn.functional.cosine_similarity(cpu_update, gpu_update, dim=0)
    assert cosine > 0.98 and gpu_update.norm() == pytest.approx(cpu_update.norm().item(), rel=0.05)


def _attention_ops(precision: str) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    engine = _engine(_objective().cuda(), precision, 0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        loss, _ = engine(_batch("cuda"))
        engine.backward(loss)
    return sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name})


def test_bf16_attention_runs_a_fused_kernel_not_the_math_one():
    (ops,) = run_ranks(1, _attention_ops, "bf16", device="cuda")
    fused = [op for op in ops if any(k in op for k in ("flash", "efficient", "cudnn"))]
    assert fused, ops  # the vision tower (no mask): flash; the causal text tower: efficient or cudnn
    assert not any("math" in op for op in ops), ops


def _compiled_and_eager() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    objective = _objective().cuda()
    x = _batch("cuda")["image"]
    eager = objective.model.encode("image", x)
    eager.sum().backward()
    eager_grad = objective.model.encoders["image"].conv1.weight.grad.clone()
    objective.zero_grad()
    objective.model.encoders["image"].compile()  # inductor, Triton kernels on CUDA
    compiled = objective.model.encode("image", x)
    compiled.sum().backward()
    return eager.cpu(), compiled.cpu(), eager_grad.cpu(), objective.model.encoders["image"].conv1.weight.grad.cpu()


def test_torch_compile_on_cuda_gives_the_eager_numbers():
    ((eager, compiled, eager_grad, compiled_grad),) = run_ranks(1, _compiled_and_eager, device="cuda", timeout=600)
    assert torch.allclose(eager, compiled, atol=1e-4)
    assert torch.allclose(eager_grad, compiled_grad, atol=1e-4, rtol=1e-3)


def _train_save_or_resume(device: str, directory: str, step: int, resume: bool) -> dict[str, torch.Tensor]:
    from contrastive.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    objective = _objective().to(device)
    engine = _engine(objective, "fp32", 0)
    loaded = None
    if resume:
        load_checkpoint(latest_checkpoint(directory), engine)
        loaded = {k: v.detach().cpu().clone() for k, v in objective.state_dict().items()}
    loss, _ = engine(_batch(device))
    engine.backward(loss)
    engine.step()
    save_checkpoint(directory, step, engine, meta={}, rank_state={})
    saved = {k: v.detach().cpu().clone() for k, v in objective.state_dict().items()}
    return {"loaded": loaded, "saved": saved, "step": engine.optimizer.state_dict()["state"][0]["step"]}


def test_a_checkpoint_saved_on_the_gpu_resumes_on_the_cpu_and_back(tmp_path):
    (gpu,) = run_ranks(1, _train_save_or_resume, "cuda", str(tmp_path), 1, False, device="cuda")
    (cpu,) = run_ranks(1, _train_save_or_resume, "cpu", str(tmp_path), 2, True)
    (back,) = run_ranks(1, _train_save_or_resume, "cuda", str(tmp_path), 3, True, device="cuda")
    for key, value in gpu["saved"].items():
        assert torch.equal(cpu["loaded"][key], value), key  # the GPU's weights, on the CPU
        assert torch.equal(back["loaded"][key], cpu["saved"][key]), key  # and the CPU's, back on the GPU
    assert int(back["step"]) == 3  # AdamW's state travelled too
