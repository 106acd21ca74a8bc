"""FSDP2 under torchrun (2 gloo processes) equals one process on the same global batch; DCP reshards on resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from m4v.training.metrics import read_metrics
from m4v.training.testing import tiny_config, tiny_config_dict
from m4v.training.trainer import Trainer

STAGES = [
    dict(steps=2, height=64, width=64, num_frames=1, batch_size=4, name="t2i"),
    dict(steps=2, height=64, width=64, num_frames=9, image_ratio=0.0, batch_size=4, name="t2v"),
]


pytestmark = pytest.mark.usefixtures("one_thread")


COMMON = dict(stages=STAGES, ema={"decay": 0.9}, optim={"lr": 2e-3, "weight_decay": 0.01})


def _run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Run in a new session so that a timeout kills torchrun's workers too."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return -1, "timed out\n" + err
    return proc.returncode, err


def test_two_gloo_ranks_match_one_process(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    run2 = tmp_path / "two"
    d = tiny_config_dict(run2, checkpoint={"every": 2, "keep": 2, "export_final": True, "resume": "none"}, **COMMON)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(d))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "m4v.training.trainer", "--config", str(path)]
    code, err = _run(cmd, env, timeout=240)
    assert code == 0, err[-3000:]

    one = Trainer(tiny_config(tmp_path / "one", checkpoint={"export_final": True, "every": 100}, **COMMON))
    hist = one.train()
    two = read_metrics(run2 / "metrics.csv")
    assert len(two) == 4
    for a, b in zip(hist, two):
        assert a["loss"] == pytest.approx(float(b["loss"]), rel=1e-5, abs=1e-7)
        assert a["grad_norm"] == pytest.approx(float(b["grad_norm"]), rel=1e-4)
    for name in ("transformer", "transformer_ema"):
        w1 = load_file(str(tmp_path / "one" / "final" / name / "diffusion_pytorch_model.safetensors"))
        w2 = load_file(str(run2 / "final" / name / "diffusion_pytorch_model.safetensors"))
        assert w1.keys() == w2.keys()
        for k in w1:
            torch.testing.assert_close(w1[k], w2[k], atol=2e-5, rtol=1e-4)

    # the 2-rank checkpoint of step 2 resumes in one process (DCP reshards) and continues identically
    shutil.copytree(run2 / "checkpoints" / "step-00000002", tmp_path / "ck")
    resumed = Trainer(tiny_config(tmp_path / "res", checkpoint={"resume": str(tmp_path / "ck"), "every": 100},
                                  **COMMON))
    assert resumed.step == 2
    rest = resumed.train()
    for a, b in zip(hist[2:], rest):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
