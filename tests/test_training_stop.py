"""Graceful stop (m4v.training.stop): SIGTERM / Ctrl-C end a run after the step in flight with a checkpoint and the
final export, the run resumes exactly where it stopped, and `m4v train` exits with 128 + the signal number."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from m4v.training.metrics import read_metrics
from m4v.training.stop import GracefulStop
from m4v.training.testing import tiny_config, tiny_config_dict
from m4v.training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
STAGES = [dict(steps=4, height=64, width=64, num_frames=9, image_ratio=0.3, batch_size=2)]
COMMON = dict(stages=STAGES, optim={"lr": 1e-3, "warmup_steps": 1, "schedule": "cosine"}, ema={"decay": 0.9})


class _SignalAt(Trainer):
    """A trainer that sends itself ``signum`` while recording step ``at`` (as a scheduler would, mid-run)."""

    at, signum = 1, signal.SIGTERM

    def _record(self, plan, *args, **kwargs):
        if plan.step == self.at:
            os.kill(os.getpid(), self.signum)
        return super()._record(plan, *args, **kwargs)


def test_sigterm_stops_after_the_step_saves_exports_and_resumes_exactly(tmp_path: Path) -> None:
    straight = Trainer(tiny_config(tmp_path / "a", **COMMON))
    full = [r["loss"] for r in straight.train()]

    before = signal.getsignal(signal.SIGTERM)
    ckpt = {"every": 100, "export_final": True, "resume": "auto"}
    first = _SignalAt(tiny_config(tmp_path / "b", checkpoint=ckpt, **COMMON))
    part1 = [r["loss"] for r in first.train()]
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the run's only
    assert first.step == 2 and len(part1) == 2 and first.stopped_by == signal.SIGTERM
    assert (tmp_path / "b" / "checkpoints" / "step-00000002" / "meta.json").is_file()
    assert (tmp_path / "b" / "final" / "transformer" / "config.json").is_file()
    assert [int(r["step"]) for r in read_metrics(tmp_path / "b" / "metrics.csv")] == [0, 1]

    second = Trainer(tiny_config(tmp_path / "b", checkpoint=ckpt, **COMMON))
    assert second.step == 2
    part2 = [r["loss"] for r in second.train()]
    assert second.stopped_by is None
    assert part1 + part2 == full  # bitwise: nothing of the stopped step was lost or repeated
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_second_ctrl_c_interrupts_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        assert stop.requested and stop.name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_cli_ctrl_c_to_the_process_group_with_data_workers(tmp_path: Path) -> None:
    """A real Ctrl-C reaches the trainer and its data workers: the workers ignore it, the trainer saves, exits 130."""
    out = tmp_path / "run"
    cfg = tiny_config_dict(out, stages=[dict(STAGES[0], steps=10_000)], data={"num_workers": 2},
                           checkpoint={"every": 10_000, "export_final": True, "resume": "none"})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "m4v", "train", "--config", str(tmp_path / "cfg.yaml")],
                            cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.csv").is_file() or len(read_metrics(out / "metrics.csv")) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-2000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        log = proc.communicate(timeout=240)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGINT, log[-2000:]
    assert "Traceback" not in log, log[-2000:]
    steps = [int(r["step"]) for r in read_metrics(out / "metrics.csv")]
    last = steps[-1] + 1
    assert (out / "checkpoints" / f"step-{last:08d}" / "meta.json").is_file()
    assert (out / "final" / "transformer" / "config.json").is_file()


def test_vae_training_stops_on_sigterm_with_export(tmp_path: Path, monkeypatch) -> None:
    """`m4v train-vae` (3 steps) told to stop during its first step: one step, checkpoint, final VAE, exit 143."""
    from conftest import run_cli
    from test_training_vae import _config

    import m4v.training.vae_training as vt
    from m4v.models.vae import VideoVAE

    loss, calls = vt.vae_loss, []

    def signalling_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    monkeypatch.setattr(vt, "vae_loss", signalling_loss)
    assert run_cli(["train-vae", "--config", _config(tmp_path, "s")]) == 128 + signal.SIGTERM
    assert [int(r["step"]) for r in read_metrics(tmp_path / "s" / "vae_metrics.csv")] == [0]
    assert (tmp_path / "s" / "checkpoints" / "step-00000001" / "meta.json").is_file()
    assert VideoVAE.from_pretrained(tmp_path / "s" / "final" / "vae").latent_channels == 16
