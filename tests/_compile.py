"""What the tests of compiled attack steps share (imported as a plain module: pytest puts tests/ on
sys.path)."""

import pytest
import torch

#: The attack step compiles whole only where dynamo traces ``autograd.grad``.
needs_traced_autograd = pytest.mark.skipif(
    not hasattr(torch._dynamo.config, "trace_autograd_ops"), reason="this torch cannot trace autograd.grad (torch >= 2.11 can)"
)


class RecordingBackend:
    """A ``torch.compile`` backend that keeps every graph dynamo hands it (``graphs``) and runs it as
    traced, without inductor: the compiled function's results are the eager ones bit for bit, and a
    graph break or a recompile shows as one more graph."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(graph)
        return graph.forward
