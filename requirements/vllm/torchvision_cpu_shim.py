"""Let PyPI's (CUDA) torchvision import beside CPU torch; installed into .venv-vllm by ./dev setup-vllm.

PyPI's torchvision wheels are CUDA builds whose C extension needs libtorch_cuda: beside torch+cpu
it does not load, and `import torchvision` then fails registering fake kernels for the
`torchvision::nms` and `::qnms` ops that only the extension defines ("operator torchvision::nms
does not exist"). vLLM's LLaVA path imports transformers' pixtral processor, which needs the
pure-Python torchvision.transforms.v2. Defining the two op schemas (no kernels) before torchvision
is imported lets that import work; detection ops stay unusable, and captioning calls none.

A `.pth` file imports this module at interpreter start (vLLM inspects models in fresh
subprocesses, so a fix inside our worker alone is not enough). It costs nothing until something
imports torchvision, and does nothing where torchvision's extension loads (a CPU or CUDA build
matching torch).
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_schemas = None  # the torch.library.Library holding the definitions must stay alive


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            define_missing_ops()
        return None  # the normal finders import torchvision


def define_missing_ops() -> bool:
    """Define torchvision::nms/qnms when torchvision's C extension cannot load; True if it did."""
    global _schemas
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None or _schemas is not None:
        return False
    import torch

    try:
        torch.ops.load_library(str(Path(spec.origin).parent / "_C.so"))
        return False
    except (OSError, RuntimeError):
        pass
    _schemas = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    return True


if "torchvision" not in sys.modules:
    sys.meta_path.insert(0, _BeforeTorchvision())
