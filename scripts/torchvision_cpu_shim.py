"""Lets the CUDA-built torchvision wheel import beside a CPU-only torch.

scripts/install.sh copies this file into the venv's site-packages (with a one-line .pth that imports
it) only when `import torchvision` fails there. torchvision's Python side registers fake kernels for
its `nms` operators at import time; when its compiled library cannot load (it links libc10_cuda), the
operators were never declared and the import fails. Declaring their schemas first makes the import,
the transforms and the models work; `torchvision.ops.nms` and `torchvision.io` still do not (images
are decoded with Pillow here).

The declaration waits for the first import of torchvision, so other Python processes in the venv do
not pay for importing torch at start-up.
"""

import importlib.abc
import sys

_library = None  # keeps the operator declarations alive for the life of the process


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        global _library
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        _library = torch.library.Library("torchvision", "DEF")
        _library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _library.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        return None  # the regular finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
