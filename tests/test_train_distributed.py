"""2-process training on CPU (gloo): DDP equals one process on the same global batch; FSDP2 runs."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from pixforge.train import checkpoint as ckpt

CONFIG = dict(
    target="vae", num_samples=16, vae_channels=[8, 8, 16, 16], batch_size=4, steps=3, checkpoint_every=100,
    crop_size=32, resolution=64, buckets=False, warmup_steps=1, log_every=1,
)


def run(tmp_path, name, processes, **changes):
    config = {**CONFIG, **changes, "output_dir": str(tmp_path / name)}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "pixforge.cli", "train", "--config", str(path)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "pixforge.cli", "train", "--config", str(path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = (tmp_path / name / "metrics.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines], tmp_path / name


def weights(run_dir):
    return load_file(str(ckpt.latest_checkpoint(run_dir) / "model.safetensors"))


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    single_losses, single_dir = run(tmp_path, "single", 1)
    ddp_losses, ddp_dir = run(tmp_path, "ddp", 2)
    assert ddp_losses == pytest.approx(single_losses, abs=2e-5)
    a, b = weights(single_dir), weights(ddp_dir)
    # Adam turns reduction-order noise in near-zero gradients into updates of up to ~lr (2e-4).
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3


def test_fsdp_trains_with_two_processes_and_writes_a_full_checkpoint(tmp_path):
    single_losses, single_dir = run(tmp_path, "single", 1, distributed="fsdp")
    fsdp_losses, fsdp_dir = run(tmp_path, "fsdp", 2, distributed="fsdp")
    assert fsdp_losses == pytest.approx(single_losses, abs=2e-5)
    a, b = weights(single_dir), weights(fsdp_dir)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
