"""What the install must leave behind: one torch, the CPU build where there is no GPU, and no
nvidia-* package on a CPU machine; and the imports that the CPU fixes make work."""

from importlib import metadata

import pytest
import torch


def test_one_torch_and_no_cuda_packages_on_cpu():
    names = [d.metadata["Name"].lower() for d in metadata.distributions()]
    assert names.count("torch") == 1
    if not torch.cuda.is_available():
        assert torch.__version__.endswith("+cpu"), torch.__version__
        assert not [n for n in names if n.startswith("nvidia-")]


def test_open_clip_torchvision_torchaudio_import():
    import open_clip  # imports torchvision
    import torchaudio.compliance.kaldi  # noqa: F401

    assert open_clip.tokenizer.SimpleTokenizer(context_length=8)("hi").shape == (1, 8)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matmul():
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    assert torch.isfinite(x @ x).all()
