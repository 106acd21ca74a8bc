"""Shared test helpers."""

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from m4v.models import M4VTransformer, named_config


def randomize_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised (adaLN-Zero, output) weights random values so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 or name.endswith("bias") and "dt_bias" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(**overrides) -> M4VTransformer:
    torch.manual_seed(0)
    return randomize_(M4VTransformer(**named_config("tiny", **overrides)))


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (the 2-core CI machine runs the training tests faster this way)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_script(relative_path: str) -> ModuleType:
    """Import a script of the repository (scripts/, benchmarks/) that is not part of the package, e.g. to call main."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OpNames(TorchDispatchMode):
    """Records the packet name of every op dispatched inside it (e.g. ``aten.mm``, ``m4v.ssd_triton_fwd``)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))

    def custom(self) -> set[str]:
        """The recorded ops of the ``m4v`` library."""
        return {n for n in self.names if n.startswith("m4v.")}


def assert_eager_equals_custom_op(eager, op, inputs, grad, op_names) -> None:  # noqa: ANN001
    """``eager(*leaves)`` dispatches no m4v custom op, ``op(*leaves)`` dispatches exactly ``op_names``, and both
    give the same output and input gradients bit for bit (for the ops of m4v.ops.eager)."""
    results = []
    for path, call in (("eager", eager), ("custom_op", op)):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        with OpNames() as ops:
            out = call(*leaves)
            out.backward(grad)
        assert ops.custom() == (set() if path == "eager" else set(op_names)), ops.names
        results.append([out.detach(), *(t.grad for t in leaves)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def run_cli(argv: list[str]) -> int:
    """Run an ``m4v`` subcommand through the real parser; errors raise (``m4v.cli.main`` maps them to exit 2)."""
    from m4v.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)
