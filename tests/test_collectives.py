"""Collectives legal on every backend (contrastive/distributed.py's two rules), checked on the CPU:
the group a CUDA run makes serves host and device tensors alike, every helper hands back its result
where its input was, the per-step flags are agreed by every rank a step later, and with
`force_collectives` one rank runs each collective for real (what the one-GPU check runs under NCCL)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from contrastive.distributed import backend_spec

from dist_utils import run_ranks


def test_a_cuda_run_makes_a_group_that_serves_host_and_device_tensors():
    spec = backend_spec("cuda")
    assert dist.BackendConfig(dist.Backend(spec)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert backend_spec("cpu") == "gloo"
    assert backend_spec("cuda", "cuda:gloo") == "cuda:gloo"  # the one-GPU check's stand-in for NCCL


def _every_helper(flag_rank: int) -> dict:
    from contrastive import distributed as d

    me = d.rank()
    x = torch.tensor([[1.0 + me, 2.0]], requires_grad=True)
    gathered = d.gather_with_grad(x)
    (gathered * torch.arange(1.0, 1.0 + gathered.numel()).view_as(gathered)).sum().backward()
    flags = d.AgreedFlags()
    flags.post(torch.tensor([0.0, 15.0 if me == flag_rank else 0.0]))
    first = flags.collect()
    flags.post(torch.tensor([1.0 if me == 0 else 0.0, 0.0]))
    return {
        "on": d.collectives_on(),
        "served": d.served_devices(),
        "gathered": gathered.detach(),
        "grad": x.grad,
        "sum": d.all_reduce_sum(torch.tensor([me + 1.0])),
        "max": d.all_reduce_max(torch.tensor([float(me)])),
        "no_grad": d.gather_no_grad(torch.tensor([me], dtype=torch.int64)),
        "objects": d.gather_objects({"rank": me}),
        "same": d.same_on_every_rank(f"from rank {me}"),
        "main": d.run_on_main(lambda: "done", what="a test's work"),
        "flags": [first, flags.collect(), flags.collect()],
    }


def test_two_ranks_run_every_helper_and_agree_on_a_flag_one_rank_raised():
    ranks = run_ranks(2, _every_helper, 1)
    for me, got in enumerate(ranks):
        assert got["on"] and got["served"] == {"cpu", "cuda"}
        assert torch.equal(got["gathered"], torch.tensor([[1.0, 2.0], [2.0, 2.0]]))
        # each rank's slice gets the summed gradient of both ranks' losses: 2 x its weights
        assert torch.equal(got["grad"], 2 * torch.tensor([[1.0 + 2 * me, 2.0 + 2 * me]]))
        assert got["sum"].item() == 3.0 and got["max"].item() == 1.0
        assert got["no_grad"].tolist() == [0, 1] and got["objects"] == [{"rank": 0}, {"rank": 1}]
        assert got["same"] == "from rank 0" and got["main"] == ("done" if me == 0 else None)
        # rank 1's signal reached rank 0; the second post's flag was raised by rank 0 alone
        assert got["flags"] == [[0.0, 15.0], [1.0, 0.0], None]


def test_one_rank_with_forced_collectives_runs_them_for_real():
    (forced,) = run_ranks(1, _every_helper, 0, init={"force_collectives": True})
    (alone,) = run_ranks(1, _every_helper, 0)
    assert forced["on"] and not alone["on"]
    for key in ("gathered", "grad", "sum", "max", "no_grad"):
        assert torch.equal(forced[key], alone[key]), key
    assert forced["objects"] == alone["objects"] == [{"rank": 0}]
    assert forced["flags"] == alone["flags"] == [[0.0, 15.0], [1.0, 0.0], None]
