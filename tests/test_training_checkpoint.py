"""DCP training checkpoints: resume when some trainable parameters have no optimizer state yet."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from m4v.training.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from m4v.training.distributed import DistInfo, cleanup, init_distributed, shard_model
from m4v.training.ema import EMA

INFO = DistInfo(rank=0, world=1, local_rank=0, device=torch.device("cpu"), distributed=False)


class TwoHeads(nn.Module):
    """``body`` then two heads; a step may use only ``head_a`` so ``head_b`` gets no gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head_a = nn.Linear(6, 3)
        self.head_b = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.body(x))
        loss = self.head_a(h).pow(2).mean()
        if use_b:
            loss = loss + self.head_b(h).sin().mean()
        return loss


def _optimizer(model: nn.Module) -> torch.optim.AdamW:
    """Two groups like ``build_optimizer``: weights with decay, biases without."""
    decay = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    plain = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": plain, "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.99)
    )


def _step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, use_b: bool) -> None:
    model(x, use_b).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (collective), or a copy of a plain tensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _state_by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Optimizer state keyed by parameter name, whole tensors, in the model's parameter order."""
    return {n: {k: _full(v) for k, v in opt.state[p].items()} for n, p in model.named_parameters() if p in opt.state}


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p) for n, p in model.named_parameters()}


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return [torch.randn(5, 4, generator=g) for _ in range(3)]


def _assert_state_equal(a: dict[str, dict[str, torch.Tensor]], b: dict[str, dict[str, torch.Tensor]]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].keys() == b[n].keys(), n
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), (n, k)


def test_resume_with_parameters_that_have_no_optimizer_state(tmp_path):
    xs = _inputs()
    torch.manual_seed(0)
    model = TwoHeads()
    opt = _optimizer(model)
    ema = EMA(model, decay=0.5)
    for i in range(2):  # head_b is never used before the checkpoint
        _step(model, opt, xs[i], use_b=False)
        ema.update(model, i)
    saved = _state_by_name(model, opt)
    assert set(saved) == {"body.weight", "body.bias", "head_a.weight", "head_a.bias"}
    path = save_checkpoint(checkpoint_path(tmp_path, 2), model, opt, ema, {"step": 2}, INFO)
    assert latest_checkpoint(tmp_path) == path
    # saving must not give the untouched parameters state (that would change the uninterrupted run)
    assert set(_state_by_name(model, opt)) == set(saved)

    torch.manual_seed(1)  # a different initialisation, overwritten by the load
    fresh = TwoHeads()
    fresh_opt = _optimizer(fresh)
    fresh_ema = EMA(fresh, decay=0.5)
    meta = load_checkpoint(path, fresh, fresh_opt, fresh_ema, INFO)
    assert meta["step"] == 2 and meta["world_size"] == 1

    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    for n in ema.names:
        assert torch.equal(ema.shadow[n], fresh_ema.shadow[n]), n
    _assert_state_equal(_state_by_name(fresh, fresh_opt), saved)  # head_b.*: no state, as in the uninterrupted run
    for g, h in zip(opt.param_groups, fresh_opt.param_groups):
        assert {k: v for k, v in g.items() if k != "params"} == {k: v for k, v in h.items() if k != "params"}

    # one more step with every parameter used gives the same weights in both runs
    before_b = fresh.head_b.weight.detach().clone()
    _step(model, opt, xs[2], use_b=True)
    _step(fresh, fresh_opt, xs[2], use_b=True)
    assert not torch.equal(fresh.head_b.weight, before_b)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    after = _state_by_name(fresh, fresh_opt)
    assert set(after) == {n for n, _ in fresh.named_parameters()}
    assert float(after["head_b.weight"]["step"]) == 1.0 and float(after["body.weight"]["step"]) == 3.0


def _distributed_main(out: Path) -> None:
    """Run under torchrun with 2 gloo ranks: resume ``out/one`` (written by one process), then write ``out/two``."""
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    xs = _inputs()
    torch.manual_seed(1)
    model = shard_model(TwoHeads(), info)
    opt = _optimizer(model)
    load_checkpoint(out / "one", model, opt, None, info)
    loaded = {"params": _params(model), "state": _state_by_name(model, opt)}
    _step(model, opt, xs[2], use_b=True)
    loaded["continued"] = _params(model)

    torch.manual_seed(0)
    model = shard_model(TwoHeads(), info)
    opt = _optimizer(model)
    for i in range(2):  # every rank sees the same batch, so the averaged gradient is the full-batch one
        _step(model, opt, xs[i], use_b=False)
    saved = {"params": _params(model), "state": _state_by_name(model, opt)}
    save_checkpoint(out / "two", model, opt, None, {"step": 2}, info)
    _step(model, opt, xs[2], use_b=True)
    saved["continued"] = _params(model)
    if info.is_main:
        torch.save({"loaded": loaded, "saved": saved}, out / "two.pt")
    cleanup(info)


@pytest.mark.usefixtures("one_thread")
def test_stateless_parameters_resume_across_rank_counts(tmp_path):
    """DCP still reshards: 1 rank -> 2 FSDP2 ranks and 2 ranks -> 1, with ``head_b`` stateless in both."""
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    xs = _inputs()
    torch.manual_seed(0)
    model = TwoHeads()
    opt = _optimizer(model)
    for i in range(2):
        _step(model, opt, xs[i], use_b=False)
    saved_one = {"params": _params(model), "state": _state_by_name(model, opt)}
    save_checkpoint(tmp_path / "one", model, opt, None, {"step": 2}, INFO)
    _step(model, opt, xs[2], use_b=True)
    continued_one = _params(model)

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__]
    cmd.append(str(tmp_path))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=False)

    # 1 -> 2 ranks: the shards hold exactly the saved weights and state, and head_b has none
    loaded = two["loaded"]
    assert all(torch.equal(loaded["params"][n], v) for n, v in saved_one["params"].items())
    assert not any(n.startswith("head_b") for n in loaded["state"])
    _assert_state_equal(loaded["state"], saved_one["state"])
    for n, v in continued_one.items():  # FSDP averages identical per-rank gradients: equal up to rounding
        torch.testing.assert_close(loaded["continued"][n], v, rtol=1e-6, atol=1e-7)
    assert not torch.equal(loaded["continued"]["head_b.weight"], saved_one["params"]["head_b.weight"])

    # 2 -> 1 rank
    saved_two = two["saved"]
    assert not any(n.startswith("head_b") for n in saved_two["state"])
    torch.manual_seed(1)
    fresh = TwoHeads()
    fresh_opt = _optimizer(fresh)
    assert load_checkpoint(tmp_path / "two", fresh, fresh_opt, None, INFO)["world_size"] == 2
    assert all(torch.equal(v, saved_two["params"][n]) for n, v in _params(fresh).items())
    _assert_state_equal(_state_by_name(fresh, fresh_opt), saved_two["state"])
    _step(fresh, fresh_opt, xs[2], use_b=True)
    for n, v in _params(fresh).items():
        torch.testing.assert_close(v, saved_two["continued"][n], rtol=1e-6, atol=1e-7)
    assert set(_state_by_name(fresh, fresh_opt)) == {n for n, _ in fresh.named_parameters()}


if __name__ == "__main__":
    _distributed_main(Path(sys.argv[1]))
