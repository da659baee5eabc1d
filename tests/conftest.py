"""Shared test set-up. Without a GPU the Triton kernels run under the interpreter; the variable
must be set before triton is first imported."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _declare_torchvision_ops_its_extension_cannot_load() -> None:
    """Let timm import beside a torchvision whose C extension cannot load (scripts/setup_env.sh
    installs the registry's torchvision 0.28, a CUDA build, beside CPU torch 2.13 so that the
    timm:NAME route is tested here). torchvision's import then fails only because it registers
    fakes for nms and qnms without checking that they exist; declaring their schemas lets its
    Python parts, all that timm's models use, import. The ops themselves stay unusable."""
    import glob
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    try:
        for library in glob.glob(os.path.join(os.path.dirname(spec.origin), "_C*.so")):
            torch.ops.load_library(library)
        return
    except (OSError, RuntimeError):  # a build for another torch: missing libraries or schemas
        pass
    for name in ("nms", "qnms"):
        if not hasattr(torch.ops.torchvision, name):
            schema = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            torch.library.define(f"torchvision::{name}", schema)


_declare_torchvision_ops_its_extension_cannot_load()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state, so failures reproduce."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny tensors: intra-op threads only add synchronisation, which on a shared
    2-core machine costs orders of magnitude (measured 10-60x). Restored afterwards. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
