"""Training loop: exact resume, atomic checkpoints, refusal of other runs' checkpoints,
buckets, corrupt images, feature cache reuse (tiny models, seconds each)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from pixforge.errors import CheckpointError, PixforgeError
from pixforge.shapes.world import CATEGORIES
from pixforge.train import checkpoint as ckpt
from pixforge.train.config import TrainConfig
from pixforge.train.data import BucketBatches, ImageFolderDataset, bucket_sizes, shard
from pixforge.train.loop import build_vae, train


def vae_config(tmp_path, **changes):
    base = dict(
        output_dir=str(tmp_path / "run"), target="vae", num_samples=24, vae_channels=(8, 8, 16, 16),
        batch_size=4, steps=4, checkpoint_every=100, crop_size=32, resolution=64, buckets=False,
        warmup_steps=2, log_every=1,
    )
    base.update(changes)
    return TrainConfig(**base)


def final_state(run_dir):
    latest = ckpt.latest_checkpoint(run_dir)
    return load_file(str(latest / "model.safetensors")), load_file(str(latest / "ema.safetensors")), \
        torch.load(latest / "optimizer.pt", weights_only=True)


def assert_states_equal(a, b):
    model_a, ema_a, opt_a = a
    model_b, ema_b, opt_b = b
    for key in model_a:
        assert (model_a[key] - model_b[key]).abs().max().item() <= 1e-6, key
        assert (ema_a[key] - ema_b[key]).abs().max().item() <= 1e-6, key
    for index, state in opt_a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert (state[name] - opt_b["optimizer"]["state"][index][name]).abs().max().item() <= 1e-6


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    straight = train(vae_config(tmp_path / "a"), progress=False)
    first = train(vae_config(tmp_path / "b"), stop_after=2, progress=False)
    assert first.stopped_early and first.step == 2
    second = train(vae_config(tmp_path / "b"), progress=False)  # the same command continues
    assert second.step == 4 and not second.stopped_early
    assert straight.losses[2:] == pytest.approx(second.losses, abs=1e-6)
    assert_states_equal(final_state(tmp_path / "a" / "run"), final_state(tmp_path / "b" / "run"))


def test_run_that_is_already_finished_does_no_more_steps(tmp_path):
    train(vae_config(tmp_path, steps=2), progress=False)
    again = train(vae_config(tmp_path, steps=2), progress=False)
    assert again.step == 2 and again.losses == []


def test_checkpoint_from_a_different_run_is_refused_naming_the_fields(tmp_path):
    train(vae_config(tmp_path, steps=2), progress=False)
    with pytest.raises(CheckpointError, match="fields lr, vae_channels differ"):
        train(vae_config(tmp_path, steps=2, lr=1e-3, vae_channels=(8, 8, 16, 32)), progress=False)


def test_only_the_last_k_checkpoints_are_kept(tmp_path):
    train(vae_config(tmp_path, steps=4, checkpoint_every=1, keep_last=2), progress=False)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step-00000003", "step-00000004"]


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    train(vae_config(tmp_path, steps=2), progress=False)
    before = final_state(tmp_path / "run")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing the optimizer state")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        train(vae_config(tmp_path, steps=3), progress=False)
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(tmp_path / "run").name == "step-00000002"
    assert_states_equal(before, final_state(tmp_path / "run"))
    resumed = train(vae_config(tmp_path, steps=3), progress=False)  # and the run can go on
    assert resumed.step == 3


def test_metrics_csv_has_loss_lr_grad_norm_and_throughput(tmp_path):
    train(vae_config(tmp_path, steps=3), progress=False)
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,loss,lr,grad_norm,samples_per_s,gflops_per_s,mfu,wall_s"
    assert len(lines) == 4 and float(lines[-1].split(",")[1]) > 0


def test_finished_vae_run_exports_a_diffusers_vae_with_a_measured_scaling_factor(tmp_path):
    from pixforge.models.vae import AutoencoderKL

    train(vae_config(tmp_path, steps=2), progress=False)
    config = json.loads((tmp_path / "run" / "final" / "vae" / "config.json").read_text())
    assert config["scaling_factor"] != 1.0 and config["scaling_factor"] > 0
    assert AutoencoderKL.from_pretrained(tmp_path / "run" / "final" / "vae").config.block_out_channels == (8, 8, 16, 16)


def test_bucket_batches_are_single_size_and_cover_each_sample_once_per_epoch():
    buckets = tuple([0] * 10 + [1] * 7 + [2] * 9)
    batches = BucketBatches(buckets, batch_size=3, seed=0)
    epoch = batches.epoch(0)
    assert all(len({buckets[i] for i in batch}) == 1 for batch in epoch)
    seen = [i for batch in epoch for i in batch]
    assert len(seen) == len(set(seen)) == 3 * (10 // 3 + 7 // 3 + 9 // 3)
    assert batches.epoch(0) == epoch and batches.epoch(1) != epoch


def test_global_batch_is_split_evenly_across_ranks():
    batch = list(range(8))
    assert shard(batch, 0, 2) + shard(batch, 1, 2) == batch


def test_bucket_sizes_keep_the_area_and_sixteen_pixel_multiples():
    sizes = bucket_sizes(128)
    assert (128, 128) in sizes and (144, 112) in sizes and (112, 144) in sizes
    assert all(w % 16 == 0 and h % 16 == 0 and 0.8 < w * h / 128**2 < 1.2 for w, h in sizes)


def test_corrupt_images_are_skipped_with_a_warning_and_counted(tmp_path, caplog):
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    records = []
    for i in range(3):
        Image.new("RGB", (64, 48), (i * 50, 0, 0)).save(folder / f"{i}.png")
        records.append({"file_name": f"{i}.png", "text": f"image {i}"})
    (folder / "broken.png").write_bytes(b"not a png")
    records.append({"file_name": "broken.png", "text": "broken"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    dataset = ImageFolderDataset(folder, bucket_sizes(64))
    assert len(dataset) == 3 and dataset.skipped == 1
    assert "skipping unreadable image broken.png" in caplog.text
    image, text = dataset[0]
    assert text == "image 0" and image.shape[0] == 3


def test_invalid_settings_are_named():
    with pytest.raises(PixforgeError, match="lr=-1"):
        TrainConfig(lr=-1, vae="x")
    with pytest.raises(PixforgeError, match="needs vae="):
        TrainConfig(target="transformer")
    with pytest.raises(PixforgeError, match="category_mix.*'postion=3'"):
        TrainConfig(vae="x", category_mix="postion=3")
    with pytest.raises(PixforgeError, match="category_mix weights the shapes world"):
        TrainConfig(vae="x", data="my_images", category_mix="position=3")
    with pytest.raises(PixforgeError, match=r"timestep_range=\[900, 300\]"):
        TrainConfig(vae="x", timestep_range=(900, 300))


@pytest.mark.parametrize("how", ["uniform", "logit-normal"])
def test_timestep_range_bounds_the_training_timesteps(how):
    from pixforge.train.loop import sample_timesteps

    t = sample_timesteps(4000, how, torch.Generator().manual_seed(0), low=300, high=900)
    assert int(t.min()) >= 300 and int(t.max()) <= 899 and t.float().std() > 100
    everything = sample_timesteps(64, how, torch.Generator().manual_seed(1))
    assert torch.equal(everything, sample_timesteps(64, how, torch.Generator().manual_seed(1), low=0, high=1000))
    assert TrainConfig(vae="x", timestep_range=[300, 900]).identity()["timestep_range"] == [300, 900]


def test_category_mix_weights_the_training_scenes_and_keys_its_own_feature_cache():
    from pixforge.shapes.world import infer_category
    from pixforge.train.data import ShapesDataset

    uniform = ShapesDataset(600, [(64, 64)], paraphrase=0.3)
    weighted = ShapesDataset(600, [(64, 64)], paraphrase=0.3, mix="position=3,counting=2")
    assert uniform.fingerprint() == "shapes:train:600:[(64, 64)]:0.3:0"  # old cache keys stay valid
    assert weighted.fingerprint() != uniform.fingerprint()

    def share(dataset, category):
        return sum(infer_category(dataset.sample(i).scene.spec()) == category for i in range(600)) / 600

    assert 0.10 < share(uniform, "position") < 0.23                 # 1/6
    assert 0.27 < share(weighted, "position") < 0.40                # 3/9
    assert 0.16 < share(weighted, "counting") < 0.29                # 2/9
    only = ShapesDataset(50, [(64, 64)], mix=",".join(f"{c}=0" for c in CATEGORIES if c != "position"))
    assert {infer_category(only.sample(i).scene.spec()) for i in range(50)} == {"position"}


@pytest.fixture(scope="module")
def tiny_vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    build_vae(TrainConfig(target="vae", vae_channels=(8, 8, 16, 16), resolution=64)).save_pretrained(folder)
    return folder


def transformer_config(tmp_path, vae_folder, **changes):
    base = dict(
        output_dir=str(tmp_path / "run"), target="transformer", model="shapes-tiny", vae=str(vae_folder),
        num_samples=16, batch_size=4, steps=3, resolution=64, buckets=False, max_text_tokens=12,
        warmup_steps=1, checkpoint_every=100,
    )
    base.update(changes)
    return TrainConfig(**base)


def test_transformer_training_resumes_exactly_and_reuses_the_feature_cache(tmp_path, tiny_vae_folder, caplog):
    import logging

    caplog.set_level(logging.INFO)
    straight = train(transformer_config(tmp_path / "a", tiny_vae_folder, sample_every=3, log_every=1), progress=False)
    train(transformer_config(tmp_path / "b", tiny_vae_folder), stop_after=1, progress=False)
    assert "from cache" not in caplog.text  # first run encodes
    caplog.clear()
    resumed = train(transformer_config(tmp_path / "b", tiny_vae_folder), progress=False)
    assert "text features from cache" in caplog.text and "latents from cache" in caplog.text
    assert straight.losses[1:] == pytest.approx(resumed.losses, abs=1e-6)
    assert_states_equal(final_state(tmp_path / "a" / "run"), final_state(tmp_path / "b" / "run"))
    from PIL import Image

    from pixforge.sampling.pipeline import PixArtPipeline

    grid = Image.open(tmp_path / "a" / "run" / "samples" / "step-00000003.png")
    assert grid.size == (64 * 4, 64)  # the four fixed prompts at the training resolution
    row = (tmp_path / "a" / "run" / "metrics.csv").read_text().splitlines()[-1].split(",")
    assert float(row[5]) > 0 and 0 < float(row[6]) < 1  # GFLOP/s and MFU
    pipe = PixArtPipeline.from_pretrained(tmp_path / "a" / "run" / "final")
    image = pipe("a red circle", height=64, width=64, num_inference_steps=2, seed=0, progress=False).images[0]
    assert image.size == (64, 64)


def test_plot_draws_the_curves_of_a_run(tmp_path):
    from typer.testing import CliRunner

    from pixforge.cli import app

    train(vae_config(tmp_path, steps=2), progress=False)
    result = CliRunner().invoke(app, ["train", "--plot", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    png = tmp_path / "run" / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_flags_map_onto_the_config_and_override_the_file(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pixforge.cli import app
    from pixforge.train import loop

    seen = {}

    def fake_train(config, **kwargs):
        seen["config"] = config
        return loop.TrainResult(step=0, losses=[], output_dir=tmp_path, stopped_early=False)

    monkeypatch.setattr(loop, "train", fake_train)
    (tmp_path / "recipe.json").write_text(json.dumps({"target": "vae", "lr": 0.5, "steps": 7}))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "recipe.json"), "--lr", "0.25",
                                      "--vae-channels", "8,16", "--no-buckets"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.lr, config.steps, config.vae_channels, config.buckets) == (0.25, 7, (8, 16), False)


def test_model_from_run_returns_the_newest_checkpoints_ema_weights(tmp_path):
    from pixforge.models.vae import AutoencoderKL
    from pixforge.train.export import model_from_run

    train(vae_config(tmp_path, steps=3, checkpoint_every=2), stop_after=2, progress=False)
    vae, step = model_from_run(tmp_path / "run")
    assert isinstance(vae, AutoencoderKL) and step == 2
    ema = load_file(str(ckpt.latest_checkpoint(tmp_path / "run") / "ema.safetensors"))
    assert torch.equal(vae.state_dict()["decoder.conv_out.weight"], ema["vae.decoder.conv_out.weight"])


def test_model_from_run_reads_a_chosen_older_checkpoint(tmp_path):
    """The GPU recipe's learning curve scores every kept checkpoint, not only the newest."""
    from pixforge.train.export import model_and_config_from_run

    train(vae_config(tmp_path, steps=4, checkpoint_every=2, keep_last=3), progress=False)
    first, last = ckpt.list_checkpoints(tmp_path / "run")[0], ckpt.latest_checkpoint(tmp_path / "run")
    old, step, _ = model_and_config_from_run(tmp_path / "run", checkpoint=first)
    new, new_step, _ = model_and_config_from_run(tmp_path / "run")
    assert (step, new_step) == (2, 4) and first != last
    ema = load_file(str(first / "ema.safetensors"))
    assert torch.equal(old.state_dict()["decoder.conv_out.weight"], ema["vae.decoder.conv_out.weight"])
    assert not torch.equal(old.state_dict()["decoder.conv_out.weight"], new.state_dict()["decoder.conv_out.weight"])


def test_lr_warms_up_holds_then_cools_down_linearly_to_zero():
    from pixforge.train.loop import lr_lambda

    factor = lr_lambda(warmup_steps=10, total_steps=100, cooldown_steps=20)
    assert factor(0) == pytest.approx(0.1) and factor(9) == 1.0 and factor(79) == 1.0
    assert factor(80) == 1.0 and factor(90) == pytest.approx(0.5) and factor(99) == pytest.approx(0.05)
    assert lr_lambda(10)(10_000) == 1.0  # no cool-down: constant after warm-up
    with pytest.raises(PixforgeError, match="cooldown_steps=200"):
        TrainConfig(steps=100, cooldown_steps=200)


def test_decoder_only_fine_tuning_keeps_encoder_and_scaling_factor(tmp_path):
    from pixforge.models.vae import AutoencoderKL

    train(vae_config(tmp_path, steps=2), progress=False)
    base = tmp_path / "run" / "final" / "vae"
    before = AutoencoderKL.from_pretrained(base)
    tuned_config = vae_config(tmp_path, steps=3, vae_init=str(base), freeze_encoder=True, background_prob=0.8,
                              lr=1e-2).replace(output_dir=str(tmp_path / "tuned"))
    train(tuned_config, progress=False)
    after = AutoencoderKL.from_pretrained(tmp_path / "tuned" / "final" / "vae")
    assert after.config.scaling_factor == before.config.scaling_factor
    for name, value in before.state_dict().items():
        same = torch.equal(value, after.state_dict()[name])
        assert same if name.startswith(("encoder.", "quant_conv.")) else True
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)
    # ... so a transformer's latent cache keyed by the base VAE stays valid for the tuned one;
    # a changed encoder weight gets a new key.
    from pixforge.train.data import ShapesDataset
    from pixforge.train.loop import feature_keys

    dataset = ShapesDataset(8, [(64, 64)])
    key = feature_keys(TrainConfig(vae=str(base)), dataset)[1]
    assert feature_keys(TrainConfig(vae=str(tmp_path / "tuned" / "final" / "vae")), dataset)[1] == key
    with torch.no_grad():
        after.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    after.save_pretrained(tmp_path / "encoder-changed")
    assert feature_keys(TrainConfig(vae=str(tmp_path / "encoder-changed")), dataset)[1] != key
    with pytest.raises(PixforgeError, match="vae_channels"):
        train(tuned_config.replace(vae_channels=(8, 8, 16, 32), output_dir=str(tmp_path / "bad")), progress=False)


def test_new_identity_fields_default_when_resuming_older_checkpoints():
    from pixforge.train.config import differing_fields

    current = TrainConfig(vae="v")
    saved = {k: v for k, v in current.identity().items() if k not in ("background_prob", "vae_init")}
    assert differing_fields(saved, current.identity()) == []
    assert differing_fields(saved, current.replace(background_prob=0.5).identity()) == ["background_prob"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_the_loss_is_zero_for_a_model_that_predicts_its_target_exactly(prediction_type):
    from pixforge.train.loop import _gather, ddpm_schedule, diffusion_loss

    schedule = ddpm_schedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 400, 999])
    ab = _gather(schedule["alphas_cumprod"], t, 4)
    exact = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    config = TrainConfig(vae="v", prediction_type=prediction_type, learned_sigma_loss=False, loss_weighting="min-snr")
    loss = diffusion_loss(lambda x_t, t, text, mask: exact, schedule, x0, None, None, t, noise, config)
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    wrong = diffusion_loss(lambda x_t, t, text, mask: exact + 0.1, schedule, x0, None, None, t, noise, config)
    assert wrong.item() > 1e-4
    with pytest.raises(PixforgeError, match="prediction_type"):
        TrainConfig(vae="v", prediction_type="sample")


def test_compile_option_traces_the_training_step_and_keeps_the_loss(tmp_path, monkeypatch):
    from pixforge.train import loop

    calls = []
    real = torch.compile

    def spy(model, **kwargs):
        calls.append(kwargs)
        return real(model, **kwargs)

    monkeypatch.setattr(loop, "COMPILE_BACKEND", "eager")  # dynamo tracing without C++ codegen
    monkeypatch.setattr(torch, "compile", spy)
    train(vae_config(tmp_path, steps=2, compile=True), progress=False)
    compiled = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    train(vae_config(tmp_path, steps=2).replace(output_dir=str(tmp_path / "plain")), progress=False)
    plain = (tmp_path / "plain" / "metrics.csv").read_text().splitlines()
    assert calls == [{"backend": "eager"}]
    loss_column = compiled[0].split(",").index("loss")
    for a, b in zip(compiled[1:], plain[1:]):
        assert float(a.split(",")[loss_column]) == pytest.approx(float(b.split(",")[loss_column]), rel=1e-5)


def test_time_budget_sizes_the_run_from_the_measured_rate_then_freezes_at_the_cool_down():
    from pixforge.train.loop import StepPlan, TimeBudget, lr_lambda

    config = TrainConfig(target="vae", steps=10_000, cooldown_fraction=0.25, warmup_steps=1)
    plan = StepPlan.from_config(config)
    assert (plan.total, plan.cooldown) == (10_000, 2500)
    factor = lr_lambda(1, plan=plan)
    budget = TimeBudget(1.0, plan, config, warmup=5, every=10)  # 60 s
    start = budget.started
    for step in range(1, 21):  # 10 steps/s after the warm-up steps
        budget.update(step, step, now=start + 0.5 + 0.1 * step)
    # 20 steps done at t = 2.5 s, 10 steps/s, 57.5 s left -> 20 + 575 steps, the last quarter cooling
    assert plan.total == 595 and plan.cooldown == round(0.25 * 595)
    assert factor(594) == pytest.approx(1 / plan.cooldown)  # the schedule reads the new plan
    for step in range(21, 500):  # slower now: 5 steps/s -> re-estimated until the cool-down starts
        budget.update(step, step, now=start + 2.5 + 0.2 * (step - 20))
    assert budget.frozen and plan.total < 595
    frozen = plan.total
    budget.update(500, 500, now=start + 30)
    assert plan.total == frozen
    # out of time before any estimate: stop where it is
    late = StepPlan.from_config(config)
    slow = TimeBudget(0.01, late, config)
    slow.update(3, 3, now=slow.started + 1.0)
    assert late.total == 3 and slow.frozen


def test_a_time_budgeted_run_stops_early_and_exports(tmp_path):
    result = train(vae_config(tmp_path, steps=10_000, time_budget_minutes=0.001, cooldown_fraction=0.5),
                   progress=False)
    assert 1 <= result.step < 10_000 and not result.stopped_early
    assert (tmp_path / "run" / "final" / "vae" / "config.json").exists()


def test_prefetched_images_equal_inline_rendering_and_training_is_unchanged(tmp_path):
    from pixforge.train.data import build_dataset
    from pixforge.train.loop import ImagePrefetcher

    dataset = build_dataset("shapes", 64, False, 24, 0.0, 0, 0.0)
    prefetcher = ImagePrefetcher(dataset, workers=2)
    try:
        prefetcher.prefetch([[3, 1, 4, 15, 9], [2, 6]])
        assert torch.equal(prefetcher.get([3, 1, 4, 15, 9]), torch.stack([dataset[i][0] for i in (3, 1, 4, 15, 9)]))
        assert torch.equal(prefetcher.get([7, 8]), torch.stack([dataset[i][0] for i in (7, 8)]))  # not prefetched
    finally:
        prefetcher.close()
    inline = train(vae_config(tmp_path / "a", steps=3), progress=False)
    workers = train(vae_config(tmp_path / "b", steps=3, num_workers=2), progress=False)
    assert inline.losses == workers.losses
    assert_states_equal(final_state(tmp_path / "a" / "run"), final_state(tmp_path / "b" / "run"))


def test_feature_cache_built_by_workers_equals_the_serial_one(tmp_path, tiny_vae_folder):
    from safetensors.torch import load_file as load

    from pixforge.train.loop import prepare_features

    config = transformer_config(tmp_path, tiny_vae_folder, num_samples=40, buckets=True)
    serial = prepare_features(config, tmp_path / "serial")
    parallel = prepare_features(config.replace(num_workers=2), tmp_path / "parallel")
    names = sorted(p.name for p in serial.iterdir())
    assert names == sorted(p.name for p in parallel.iterdir()) and len(names) == 2
    for name in names:
        a, b = load(serial / name), load(parallel / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and a run that finds it (linked as its feature_cache) encodes nothing
    run = tmp_path / "run"
    run.mkdir()
    (run / "feature_cache").symlink_to(parallel, target_is_directory=True)
    result = train(config.replace(output_dir=str(run), steps=1), progress=False)
    assert result.step == 1


def test_feature_table_gathers_a_bucket_batch_and_refuses_mixed_buckets():
    from pixforge.train.loop import FeatureTable

    latents = {"bucket0": torch.arange(3 * 4.0).reshape(3, 1, 2, 2).bfloat16(), "index0": torch.tensor([0, 2, 4]),
               "bucket1": -torch.arange(2 * 4.0).reshape(2, 1, 2, 2).bfloat16(), "index1": torch.tensor([1, 3])}
    text = (torch.tensor([1, 0, 1, 1, 0], dtype=torch.int32), torch.randn(2, 3, 5).bfloat16(),
            torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.int8))
    table = FeatureTable(latents, text, "cpu")
    x0, embeds, mask = table.batch([4, 0])
    assert torch.equal(x0, latents["bucket0"][[2, 0]].float())
    assert torch.equal(embeds, text[1][[0, 1]].float()) and mask.tolist() == [[1, 1, 0], [1, 0, 0]]
    with pytest.raises(PixforgeError, match="one known bucket"):
        table.batch([0, 1])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_weight_floor_sets_the_weight_of_the_x0_error_at_high_noise(prediction_type):
    """The per-sample weight, read as the weight of |x0 error|^2: min(snr, γ) with min-SNR,
    at least `x0_weight_floor` with the floor, the target-space weight capped by `loss_weight_cap`."""
    from pixforge.train.loop import _gather, ddpm_schedule, diffusion_loss

    schedule = ddpm_schedule()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    error = torch.randn(1, 4, 8, 8, generator=g)

    def loss_at(step: int, **options) -> tuple[float, float]:
        t = torch.tensor([step])
        ab = _gather(schedule["alphas_cumprod"], t, 4)
        target = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        config = TrainConfig(vae="v", prediction_type=prediction_type, learned_sigma_loss=False, **options)
        loss = diffusion_loss(lambda x_t, t, text, mask: target + error, schedule, x0, None, None, t, noise, config)
        snr = float(ab / (1 - ab))
        return loss.item() / error.pow(2).mean().item(), snr

    per_x0 = (lambda snr: snr + 1) if prediction_type == "v_prediction" else (lambda snr: snr)
    for step in (100, 500, 800, 999):
        weight, snr = loss_at(step, loss_weighting="min-snr")
        assert weight == pytest.approx(min(snr, 5.0) / per_x0(snr), rel=1e-5)
        weight, snr = loss_at(step, loss_weighting="min-snr", x0_weight_floor=0.2)
        assert weight == pytest.approx(max(min(snr, 5.0), 0.2) / per_x0(snr), rel=1e-5)
        weight, snr = loss_at(step, loss_weighting="min-snr", x0_weight_floor=0.2, loss_weight_cap=50.0)
        assert weight == pytest.approx(min(max(min(snr, 5.0), 0.2) / per_x0(snr), 50.0), rel=1e-5)
        weight, snr = loss_at(step, x0_weight_floor=0.2)  # no min-SNR: the x0 error keeps weight per_x0(snr)
        assert weight == pytest.approx(max(per_x0(snr), 0.2) / per_x0(snr), rel=1e-5)
    # at the layout-deciding noise levels the floor is what counts: > 10x the min-SNR weight at t = 800
    assert loss_at(800, loss_weighting="min-snr", x0_weight_floor=0.2)[0] > 10 * loss_at(800, loss_weighting="min-snr")[0]
    assert loss_at(100, loss_weighting="min-snr", x0_weight_floor=0.2)[0] == loss_at(100, loss_weighting="min-snr")[0]
    with pytest.raises(PixforgeError, match="x0_weight_floor"):
        TrainConfig(vae="v", x0_weight_floor=-1.0)
