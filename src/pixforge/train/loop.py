"""`pixforge train`: one loop for the transformer and the VAE, from a 2-core CPU to many GPUs.

The same command runs single-process, under `torchrun` or under `accelerate launch`
(DDP: gloo on CPU, nccl on GPU). Re-running a command continues from its last
checkpoint: model, EMA, optimizer, LR schedule, RNG states and data position are restored,
so an interrupted run ends bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import copy
import csv
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pixforge.errors import CheckpointError, PixforgeError
from pixforge.train import checkpoint as ckpt
from pixforge.train.config import TrainConfig, differing_fields
from pixforge.train.data import (
    BucketBatches, all_captions, cache_key, dataset_for, encoder_digest, render_images, shard, text_cache_path,
)

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    output_dir: Path
    stopped_early: bool


# ------------------------------------------------------------------------------ objectives
def ddpm_schedule(num_train_timesteps: int = 1000) -> dict[str, torch.Tensor]:
    """PixArt's training schedule (float64 linear betas, as the official repo), with the
    posterior terms the learned-variance VLB needs."""
    betas = torch.linspace(1e-4, 0.02, num_train_timesteps, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "posterior_log_variance_clipped": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """IDDPM's decoder likelihood for t = 0 (data in [-1, 1] on a 255-bin grid)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def vlb_term(schedule, x0, x_t, t, eps_pred, var_interp) -> torch.Tensor:
    """Per-sample VLB (bits/dim) of the learned-range variance, the mean held fixed
    (stop-grad on ε), as PixArt / IDDPM train their learned sigma."""
    nd = x0.ndim
    coef1, coef2 = _gather(schedule["posterior_mean_coef1"], t, nd), _gather(schedule["posterior_mean_coef2"], t, nd)
    true_mean = coef1 * x0 + coef2 * x_t
    true_log_var = _gather(schedule["posterior_log_variance_clipped"], t, nd)
    alpha_bar = _gather(schedule["alphas_cumprod"], t, nd)
    pred_x0 = (x_t - (1 - alpha_bar).sqrt() * eps_pred.detach()) / alpha_bar.sqrt()
    model_mean = coef1 * pred_x0 + coef2 * x_t
    min_log, max_log = true_log_var, _gather(torch.log(schedule["betas"]), t, nd)
    frac = (var_interp + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    kl = 0.5 * (-1.0 + model_log_var - true_log_var + torch.exp(true_log_var - model_log_var)
                + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var))
    kl = kl.mean(dim=tuple(range(1, nd))) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)
    nll = nll.mean(dim=tuple(range(1, nd))) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def sample_timesteps(batch: int, how: str, generator: torch.Generator, num_train_timesteps: int = 1000,
                     low: int = 0, high: int | None = None) -> torch.Tensor:
    """Training timesteps in [low, high) (default: all): uniform, or logit-normal over that range."""
    high = num_train_timesteps if high is None else high
    if how == "uniform":
        return torch.randint(low, high, (batch,), generator=generator)
    # logit-normal (SD3): more weight on the middle of the schedule
    u = torch.sigmoid(torch.randn(batch, generator=generator))
    return (low + u * (high - low)).long().clamp(low, high - 1)


def diffusion_loss(model, schedule, x0, text, mask, t, noise, config: TrainConfig):
    """ε- or v-MSE (optionally min-SNR weighted) + learned-variance VLB; per-sample mean."""
    alpha_bar = _gather(schedule["alphas_cumprod"], t, x0.ndim)
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    out = model(x_t, t, text, mask).float()
    channels = x0.shape[1]
    pred = out[:, :channels]
    if config.prediction_type == "v_prediction":
        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0  # v
        eps_pred = (1 - alpha_bar).sqrt() * x_t.float() + alpha_bar.sqrt() * pred
    else:
        target, eps_pred = noise, pred
    mse = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    if config.loss_weighting == "min-snr" or config.x0_weight_floor > 0:
        # In x0 terms: ε-MSE = snr·|x0 error|², v-MSE = (snr + 1)·|x0 error|² (`per_x0`).
        snr = (alpha_bar / (1 - alpha_bar)).flatten()
        per_x0 = snr + 1 if config.prediction_type == "v_prediction" else snr
        # Min-SNR-γ (Hang et al.): the x0 error weighs min(snr, γ) for ε and v alike.
        x0_weight = torch.clamp(snr, max=config.min_snr_gamma) if config.loss_weighting == "min-snr" else per_x0
        x0_weight = torch.clamp(x0_weight, min=config.x0_weight_floor)
        if config.loss_weight_cap > 0:
            mse = mse * torch.clamp(x0_weight / per_x0, max=config.loss_weight_cap)
        else:
            mse = mse * x0_weight / per_x0
    loss = mse
    if config.learned_sigma_loss and out.shape[1] == 2 * channels:
        loss = loss + vlb_term(schedule, x0.float(), x_t.float(), t, eps_pred, out[:, channels:])
    return loss.mean()


class VAEObjective(torch.nn.Module):
    """The VAE's training loss as a module, so DDP/FSDP see it as one forward.

    L1 + MSE reconstruction of the posterior mode (deterministic latents reconstruct flat
    colours far better than samples at this budget), + a small KL to keep latents tame.
    """

    def __init__(self, vae, kl_weight: float, freeze_encoder: bool = False):
        super().__init__()
        self.vae = vae
        self.kl_weight = kl_weight
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:  # decoder-only fine-tuning: the latents (and a transformer on them) stay valid
            vae.encoder.requires_grad_(False)
            vae.quant_conv.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.freeze_encoder:
            with torch.no_grad():
                posterior = self.vae.encode(images)
            return F.l1_loss(recon := self.vae.decode(posterior.mode()), images) + F.mse_loss(recon, images)
        posterior = self.vae.encode(images)
        recon = self.vae.decode(posterior.mode())
        kl = 0.5 * (posterior.mean**2 + posterior.logvar.exp() - 1 - posterior.logvar).mean()
        return F.l1_loss(recon, images) + F.mse_loss(recon, images) + self.kl_weight * kl


# ------------------------------------------------------------------------------- builders
def build_transformer(config: TrainConfig, caption_channels: int):
    from pixforge.models.presets import PRESETS, get_preset
    from pixforge.models.transformer import PixArtTransformer

    if Path(config.model).exists():
        return PixArtTransformer.from_pretrained(config.model).train()
    preset = get_preset(config.model)
    if preset.caption_channels != caption_channels:
        raise PixforgeError(
            f"model {config.model!r} expects {preset.caption_channels}-d captions but the text encoder gives "
            f"{caption_channels}-d; choose a preset made for it (shapes-*: 384-d MiniLM) — presets: {', '.join(PRESETS)}"
        )
    torch.manual_seed(config.seed)
    return PixArtTransformer(preset).initialize_weights().train()


def build_vae(config: TrainConfig):
    from pixforge.models.vae import AutoencoderKL, VAEConfig

    channels = config.vae_channels
    vae_config = VAEConfig(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=min(32, min(channels)),
        sample_size=config.resolution,
        scaling_factor=1.0,
    )
    if config.vae_init:  # continue from a trained VAE (e.g. decoder-only fine-tuning)
        vae = AutoencoderKL.from_pretrained(config.vae_init)
        if tuple(vae.config.block_out_channels) != tuple(channels):
            raise PixforgeError(
                f"vae_init {config.vae_init} has channels {tuple(vae.config.block_out_channels)} but "
                f"vae_channels={tuple(channels)}; set vae_channels to match"
            )
        return vae.train()
    torch.manual_seed(config.seed)
    return AutoencoderKL(vae_config).train()


def build_text_encoder(name: str, max_tokens: int, device="cpu"):
    from pixforge.models.text import MiniLMTextEncoder, T5TextEncoder

    if name == "minilm":
        return MiniLMTextEncoder.from_package(default_max_length=max_tokens, device=device)
    return T5TextEncoder.from_pretrained(name, device=device)


# ---------------------------------------------------------------------------------- loop
class _StopRequested:
    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading_main():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        logger.warning("signal %s: checkpointing and stopping after this step", signum)
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# torch.compile backend for `compile = true` (tests swap in "eager" to trace without codegen).
COMPILE_BACKEND = "inductor"


@dataclass
class StepPlan:
    """How many steps the run takes and how many of them cool down (mutable: a time budget
    re-estimates it; a plain function reads it, so LambdaLR's state_dict never saves it)."""

    total: int
    cooldown: int

    @classmethod
    def from_config(cls, config: TrainConfig, total: int | None = None) -> StepPlan:
        total = config.steps if total is None else total
        if config.cooldown_fraction > 0:
            return cls(total, round(config.cooldown_fraction * total))
        return cls(total, min(config.cooldown_steps, total))


def lr_lambda(warmup_steps: int, total_steps: int = 0, cooldown_steps: int = 0, plan: StepPlan | None = None):
    """Linear warm-up, constant, then (WSD) a linear cool-down to 0 over the last steps."""
    plan = plan if plan is not None else StepPlan(total_steps, cooldown_steps)

    def factor(step: int) -> float:
        value = min(1.0, (step + 1) / max(1, warmup_steps))
        if plan.cooldown > 0 and step >= plan.total - plan.cooldown:
            value *= max(0.0, (plan.total - step) / plan.cooldown)
        return value

    return factor


class TimeBudget:
    """Sizes a run to a wall-time budget: re-estimates the step count from the measured rate
    (skipping the first warm-up steps) until the cool-down starts, then leaves it fixed."""

    def __init__(self, minutes: float, plan: StepPlan, config: TrainConfig, warmup: int = 5, every: int = 10):
        self.seconds, self.plan, self.config = 60.0 * minutes, plan, config
        self.warmup, self.every = warmup, every
        self.started = time.time()
        self.mark = None  # (steps done, time) after the warm-up steps
        self.frozen = minutes <= 0

    def update(self, step: int, steps_this_run: int, now: float | None = None) -> None:
        if self.frozen:
            return
        now = time.time() if now is None else now
        if now - self.started >= self.seconds:  # out of time before an estimate could say so: stop here
            self.plan.total, self.frozen = step, True
            logger.info("time budget: spent at step %d", step)
            return
        if steps_this_run == self.warmup:
            self.mark = (steps_this_run, now)
        if self.mark is None or steps_this_run < self.warmup + self.every or steps_this_run % self.every:
            return
        rate = (steps_this_run - self.mark[0]) / max(now - self.mark[1], 1e-9)
        remaining = self.seconds - (now - self.started)
        total = min(self.config.steps, step + max(1, int(rate * remaining)))
        new = StepPlan.from_config(self.config, total)
        self.plan.total, self.plan.cooldown = new.total, new.cooldown
        if step >= new.total - new.cooldown:
            self.frozen = True
            logger.info("time budget: %d steps (%.1f steps/s), cool-down from step %d", new.total, rate,
                        new.total - new.cooldown)


def ema_update(ema_model, model, decay: float, step: int) -> None:
    # Warm-up of the decay (as diffusers' EMAModel): early averages are not dominated by init.
    decay = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for ema_param, param in zip(ema_model.parameters(), model.parameters()):
            value = param.detach()
            value = value.full_tensor() if hasattr(value, "full_tensor") else value  # FSDP2 shards
            ema_param.lerp_(value.to(ema_param.dtype), 1.0 - decay)


def model_flops_per_sample(model, config: TrainConfig, sizes) -> float:
    """Training FLOPs per sample (3x forward) at the mean bucket size; 0 for the VAE."""
    if config.target != "transformer":
        return 0.0
    from pixforge.models.flops import forward_flops

    per = [forward_flops(model.config, h, w, config.max_text_tokens)["total"] for w, h in sizes]
    return 3.0 * sum(per) / len(per)


def train(config: TrainConfig, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Run (or continue) the training described by `config`.

    stop_after: stop (with a checkpoint) after this many steps of this invocation, as if
    interrupted; re-running continues.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    if config.batch_size % world:
        raise PixforgeError(f"batch_size={config.batch_size} must be divisible by the {world} processes")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    autocast_dtype = torch.bfloat16 if config.precision == "bf16" else None

    dataset = dataset_for(config)
    batches = BucketBatches(tuple(dataset.buckets), config.batch_size * config.grad_accum, config.seed)
    if batches.batches_per_epoch() == 0:
        raise PixforgeError(f"no full batch of {config.batch_size * config.grad_accum} fits any bucket of the data")

    text_features = latents = None
    null_text = None
    sampling_parts = None
    if config.target == "transformer":
        from pixforge.models.vae import AutoencoderKL

        # Features are computed once, on the accelerator when there is one.
        vae = AutoencoderKL.from_pretrained(config.vae).eval().to(device)
        encoder = build_text_encoder(config.text_encoder, config.max_text_tokens, device)
        cache_dir = output_dir / "feature_cache"
        text_key, latent_key = feature_keys(config, dataset)
        if rank == 0:
            captions = lambda: all_captions(dataset, config.num_workers)  # noqa: E731 (only on a cache miss)
            with torch.no_grad():
                text_features = load_text_features(cache_dir, text_key, captions, encoder, config.max_text_tokens)
                latents = load_latents(cache_dir, latent_key, dataset, vae, config.num_workers)
        accelerator.wait_for_everyone()
        if rank != 0:
            with torch.no_grad():
                text_features = load_text_features(cache_dir, text_key, None, encoder, config.max_text_tokens)
                latents = load_latents(cache_dir, latent_key, dataset, vae)
        with torch.no_grad():
            null = encoder.encode([""], config.max_text_tokens)
        null_text = (null.embeds[0].float().to(device), null.mask[0].to(device))
        caption_channels = encoder.hidden_size
        model = build_transformer(config, caption_channels)
        scaling = vae.config.scaling_factor
        features = FeatureTable(latents, text_features, device)
        del latents, text_features
        if config.sample_every and rank == 0:
            sampling_parts = (vae, encoder)  # kept for the sample grids
        else:
            encoder.unload()
            del vae
    else:
        model = VAEObjective(build_vae(config), config.kl_weight, config.freeze_encoder)

    ema_model = copy.deepcopy(model).eval().requires_grad_(False)
    use_fsdp = world > 1 and config.distributed == "fsdp"
    if use_fsdp:
        shard_model(model, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
    plan = StepPlan.from_config(config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config.warmup_steps, plan=plan))
    schedule = ddpm_schedule()

    # ----------------------------------------------------------------------- resume
    step, epoch, position = 0, 0, 0
    data_generator = torch.Generator().manual_seed(config.seed + 17)  # shared by all ranks
    latest = ckpt.latest_checkpoint(output_dir)
    if latest is not None:
        tensors, optimizer_state, state = ckpt.load_checkpoint(latest)
        differing = differing_fields(state["config"], config.identity())
        if differing:
            raise CheckpointError(
                f"{latest} belongs to a different run: fields {', '.join(differing)} differ "
                f"(saved {[state['config'].get(k) for k in differing]} vs now {[config.identity().get(k) for k in differing]}); "
                f"use another --output-dir or the original settings"
            )
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, tensors["model"], options=full)
        ema_model.load_state_dict(tensors["ema"])
        set_optimizer_state_dict(model, optimizer, optimizer_state["optimizer"], options=full)
        scheduler.load_state_dict(optimizer_state["scheduler"])
        data_generator.set_state(tensors["rng"]["data_generator"])
        torch.set_rng_state(tensors["rng"][f"torch_rank{rank}"] if f"torch_rank{rank}" in tensors["rng"] else tensors["rng"]["torch_rank0"])
        ckpt.set_rng_state(state["rng"][str(rank)] if str(rank) in state["rng"] else state["rng"]["0"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        if rank == 0:
            logger.info("resumed from %s at step %d", latest, step)
    else:
        torch.manual_seed(config.seed + rank)

    raw_model, raw_optimizer = model, optimizer
    if not use_fsdp:  # DDP (or nothing) through accelerate; FSDP2 is applied above
        model, optimizer = accelerator.prepare(model, optimizer)
    if config.compile:  # the forward/backward only; checkpoints and EMA keep using raw_model
        model = torch.compile(model, backend=COMPILE_BACKEND)
    ema_model.to(device)
    flops_per_sample = model_flops_per_sample(raw_model, config, dataset.sizes)
    # MFU against this machine's GEMM rate in the training precision (0.5 s, measured once).
    peak_gflops = 0.0
    if flops_per_sample and rank == 0:
        from pixforge.models.precision import gemm_rate

        peak_gflops = gemm_rate(autocast_dtype or torch.float32, device=device.type)

    def save(current_step: int) -> None:
        rng = {"data_generator": data_generator.get_state()}
        rng_json = {}
        gathered_torch = [torch.get_rng_state()]
        gathered_json = [ckpt.rng_state()]
        if world > 1:
            import torch.distributed as dist

            gathered_torch = [None] * world
            gathered_json = [None] * world
            dist.all_gather_object(gathered_torch, torch.get_rng_state())
            dist.all_gather_object(gathered_json, ckpt.rng_state())
        for r in range(world):
            rng[f"torch_rank{r}"] = gathered_torch[r]
            rng_json[str(r)] = gathered_json[r]
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(raw_model, options=full)  # collective under FSDP
        optimizer_state = get_optimizer_state_dict(raw_model, raw_optimizer, options=full)
        if rank == 0:
            state = {"step": current_step, "epoch": epoch, "position": position, "config": config.identity(),
                     "full_config": config.to_dict(), "rng": rng_json}
            ckpt.save_checkpoint(
                output_dir, current_step,
                {"model": model_state, "ema": ema_model.state_dict(), "rng": rng},
                {"optimizer": optimizer_state, "scheduler": scheduler.state_dict()},
                state, config.keep_last,
            )
        accelerator.wait_for_everyone()

    # ---------------------------------------------------------------------- the loop
    losses: list[float] = []
    log_path = output_dir / "metrics.csv"
    new_log = not log_path.exists()
    log_file = open(log_path, "a", newline="") if rank == 0 else None
    writer = csv.writer(log_file) if log_file else None
    if writer and new_log:
        writer.writerow(["step", "loss", "lr", "grad_norm", "samples_per_s", "gflops_per_s", "mfu", "wall_s"])
    epoch_batches = batches.epoch(epoch)
    started = time.time()
    budget = TimeBudget(config.time_budget_minutes, plan, config)
    last_checkpoint = time.time()
    steps_this_run = 0
    window_start, window_samples = time.time(), 0
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=config.steps, initial=step, desc=f"train {config.target}", dynamic_ncols=True)
    stopped_early = False
    prefetcher = ImagePrefetcher(dataset, config.num_workers if config.target == "vae" else 0)
    with _StopRequested() as stop:
        while step < plan.total:
            if position >= len(epoch_batches):
                epoch, position = epoch + 1, 0
                epoch_batches = batches.epoch(epoch)
            global_batch = epoch_batches[position]
            position += 1
            optimizer.zero_grad(set_to_none=True)
            micro_size = config.batch_size
            if prefetcher.pool is not None:  # this rank's share of the next batches, rendered meanwhile
                prefetcher.prefetch([shard(upcoming[m * micro_size:(m + 1) * micro_size], rank, world)
                                     for upcoming in [global_batch] + epoch_batches[position:position + 2]
                                     for m in range(config.grad_accum)])
            step_loss = 0.0
            for micro in range(config.grad_accum):
                micro_batch = global_batch[micro * micro_size:(micro + 1) * micro_size]
                # Random draws for the whole global batch, identical on every rank; each rank
                # takes its slice, so N processes see exactly what one process would.
                local = shard(micro_batch, rank, world)
                lo = rank * len(local)
                with gradient_sync(accelerator, model, use_fsdp, enabled=micro == config.grad_accum - 1):
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                        if config.target == "transformer":
                            x0, text, mask = features.batch(micro_batch)
                            x0 = x0 * scaling
                            # Random draws on the CPU generator (identical on every rank and device).
                            drop = torch.rand(len(micro_batch), generator=data_generator) < config.caption_dropout
                            if drop.any():
                                drop = drop.to(device)
                                text[drop] = null_text[0]
                                mask[drop] = null_text[1]
                            t = sample_timesteps(len(micro_batch), config.timestep_sampling, data_generator,
                                                 low=config.timestep_range[0], high=config.timestep_range[1])
                            noise = torch.randn(x0.shape, generator=data_generator)
                            sl = slice(lo, lo + len(local))
                            loss = diffusion_loss(
                                model, schedule, x0[sl], text[sl], mask[sl], t[sl].to(device), noise[sl].to(device), config,
                            )
                        else:
                            images = prefetcher.get(local)
                            if config.crop_size:
                                images = random_crops(images, config.crop_size, data_generator, lo, len(micro_batch))
                            loss = model(images.to(device))
                    accelerator.backward(loss / config.grad_accum)
                step_loss += loss.detach().float() / config.grad_accum
            grad_norm = torch.tensor(0.0)
            if config.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            optimizer.step()
            scheduler.step()
            ema_update(ema_model, raw_model, config.ema_decay, step)
            step += 1
            steps_this_run += 1
            mean_loss = accelerator.reduce(step_loss.to(device), reduction="mean").item()
            losses.append(mean_loss)
            window_samples += len(global_batch)
            budget.update(step, steps_this_run)
            if bar is not None:
                bar.total = plan.total
                bar.update(1)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
            if writer and (step % config.log_every == 0 or step == plan.total):
                elapsed = max(time.time() - window_start, 1e-9)
                rate = window_samples / elapsed
                gflops = rate * flops_per_sample / 1e9
                mfu = gflops / peak_gflops if peak_gflops else 0.0
                writer.writerow([step, f"{mean_loss:.6f}", f"{scheduler.get_last_lr()[0]:.3e}", f"{float(grad_norm):.4f}",
                                 f"{rate:.2f}", f"{gflops:.2f}", f"{mfu:.3g}", f"{time.time() - started:.1f}"])
                log_file.flush()
                window_start, window_samples = time.time(), 0
            if sampling_parts is not None and step % config.sample_every == 0:
                from pixforge.train.export import sample_grid

                sample_grid(ema_model, *sampling_parts, config, output_dir / "samples" / f"step-{step:08d}.png")
            interrupted = stop.requested or (stop_after is not None and steps_this_run >= stop_after)
            due = step % config.checkpoint_every == 0 or time.time() - last_checkpoint > 60 * config.checkpoint_minutes
            if due or interrupted or step == plan.total:
                save(step)
                last_checkpoint = time.time()
            if interrupted and step < plan.total:
                stopped_early = True
                break
    prefetcher.close()
    if bar is not None:
        bar.close()
    if log_file:
        log_file.close()
    if rank == 0 and not stopped_early:
        export_final(config, raw_model, ema_model, output_dir, dataset)
    accelerator.wait_for_everyone()
    return TrainResult(step=step, losses=losses, output_dir=output_dir, stopped_early=stopped_early)


def shard_model(model, device) -> None:
    """FSDP2: shard every transformer block (or VAE stage), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    if hasattr(model, "transformer_blocks"):
        units = list(model.transformer_blocks)
    else:  # VAEObjective
        units = [*model.vae.encoder.down_blocks, *model.vae.decoder.up_blocks]
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)


class gradient_sync:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""

    def __init__(self, accelerator, model, use_fsdp: bool, enabled: bool):
        self.accelerator, self.model, self.use_fsdp, self.enabled = accelerator, model, use_fsdp, enabled
        self._context = None

    def __enter__(self):
        if self.use_fsdp:
            self.model.set_requires_gradient_sync(self.enabled)
        elif not self.enabled:
            self._context = self.accelerator.no_sync(self.model)
            self._context.__enter__()
        return self

    def __exit__(self, *exc):
        if self._context is not None:
            self._context.__exit__(*exc)
        if self.use_fsdp:
            self.model.set_requires_gradient_sync(True)
        return False


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator, offset: int, global_count: int) -> torch.Tensor:
    """Random square crops; offsets drawn for the whole global batch (rank-independent)."""
    _, _, height, width = images.shape
    tops = torch.randint(0, height - size + 1, (global_count,), generator=generator)[offset:offset + len(images)]
    lefts = torch.randint(0, width - size + 1, (global_count,), generator=generator)[offset:offset + len(images)]
    return torch.stack([img[:, t:t + size, l:l + size] for img, t, l in zip(images, tops.tolist(), lefts.tolist())])


class FeatureTable:
    """The cached features on the training device: latents per bucket, text embeddings per
    unique caption. A batch (one bucket) is two index gathers on the device; the host only
    turns sample indices into rows (a GPU step is otherwise bound by per-sample host work)."""

    def __init__(self, latents: dict[str, torch.Tensor], text_features, device):
        self.buckets = {}
        size = max((int(v.max()) + 1 for k, v in latents.items() if k.startswith("index") and len(v)), default=0)
        self.bucket_of = torch.full((size,), -1, dtype=torch.int64)
        self.row_of = torch.zeros(size, dtype=torch.int64)
        for key, value in latents.items():
            if key.startswith("index"):
                bucket = int(key[len("index"):])
                self.buckets[bucket] = latents[f"bucket{bucket}"].to(device)
                self.bucket_of[value] = bucket
                self.row_of[value] = torch.arange(len(value))
        ids, embeds, mask = text_features
        self.caption_of = ids.long()
        self.embeds, self.mask = embeds.to(device), mask.to(device)
        self.device = device

    def batch(self, indices: list[int]):
        """-> latents (B, C, h, w) float32, text (B, L, D) float32, mask (B, L) int64, on the device."""
        index = torch.tensor(indices, dtype=torch.int64)
        buckets = self.bucket_of[index].unique()
        if len(buckets) != 1 or int(buckets[0]) < 0:
            raise PixforgeError(f"a batch must come from one known bucket; got buckets {buckets.tolist()}")
        rows = self.row_of[index].to(self.device)
        captions = self.caption_of[index].to(self.device)
        return (self.buckets[int(buckets[0])][rows].float(), self.embeds[captions].float(),
                self.mask[captions].long())


class ImagePrefetcher:
    """Renders the images of upcoming batches in `workers` forked processes while the current
    step runs (0: render inline); `get(indices)` equals `stack([dataset[i][0] for i in indices])`."""

    def __init__(self, dataset, workers: int):
        self.dataset, self.workers = dataset, workers
        self.pending: dict[tuple[int, ...], list] = {}
        self.pool = None
        if workers > 0:
            import concurrent.futures
            import multiprocessing

            self.pool = concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=multiprocessing.get_context("fork"), initializer=_worker_init, initargs=(dataset,))

    def prefetch(self, upcoming: list[list[int]]) -> None:
        if self.pool is None:
            return
        for batch in upcoming:
            key = tuple(batch)
            if key and key not in self.pending:
                self.pending[key] = [self.pool.submit(_render_images, key[k::self.workers])
                                     for k in range(min(self.workers, len(key)))]

    def get(self, indices: list[int]) -> torch.Tensor:
        key = tuple(indices)
        if key not in self.pending:
            return render_images(self.dataset, key)
        parts = [future.result() for future in self.pending.pop(key)]
        images = torch.empty((len(key), *parts[0].shape[1:]), dtype=parts[0].dtype)
        for k, part in enumerate(parts):
            images[k::self.workers] = part
        return images

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


_WORKER_DATASET = None


def _worker_init(dataset) -> None:
    global _WORKER_DATASET
    _WORKER_DATASET = dataset
    torch.set_num_threads(1)


def _render_images(indices) -> torch.Tensor:
    return render_images(_WORKER_DATASET, indices)


def feature_keys(config: TrainConfig, dataset) -> tuple[str, str]:
    """Cache keys of the text features (dataset, text encoder) and the latents (dataset, the
    VAE's encoder weights: a decoder-only fine-tune keeps its latents)."""
    return (cache_key(dataset.fingerprint(), config.text_encoder, str(config.max_text_tokens)),
            cache_key(dataset.fingerprint(), "encoder", encoder_digest(config.vae)))


@torch.no_grad()
def prepare_features(config: TrainConfig, cache_dir: str | Path, device: str | torch.device = "cpu") -> Path:
    """Fill a feature cache for `config`'s data without training: several runs on the same
    data (a sweep) can then share it (link each run's OUTPUT/feature_cache to it)."""
    from pixforge.models.vae import AutoencoderKL

    cache_dir = Path(cache_dir)
    dataset = dataset_for(config)
    text_key, latent_key = feature_keys(config, dataset)
    if not text_cache_path(cache_dir, text_key).exists():  # skip building the encoder on a hit
        encoder = build_text_encoder(config.text_encoder, config.max_text_tokens, device)
        load_text_features(cache_dir, text_key, all_captions(dataset, config.num_workers), encoder, config.max_text_tokens)
        encoder.unload()
    vae = AutoencoderKL.from_pretrained(config.vae).eval().to(device)
    load_latents(cache_dir, latent_key, dataset, vae, config.num_workers)
    return cache_dir


def load_text_features(cache_dir, key, captions, encoder, max_tokens):
    from pixforge.train.data import cached_text_features

    if captions is None:
        captions = []
    ids, embeds, mask, _ = cached_text_features(cache_dir, key, captions, encoder.encode, max_tokens)
    return ids, embeds, mask


def load_latents(cache_dir, key, dataset, vae, workers: int = 0):
    from pixforge.train.data import cached_latents

    device = next(vae.parameters()).device
    data, _ = cached_latents(cache_dir, key, dataset, lambda images: vae.encode(images.to(device)).mode(),
                             workers=workers)
    return data


def export_final(config: TrainConfig, model, ema_model, output_dir: Path, dataset) -> None:
    """EMA weights in the diffusers layout: final/transformer or final/vae."""
    from pixforge.train.export import export_transformer, export_vae

    if config.target == "vae":
        # A frozen encoder gives the same latents: keep their scaling factor, so a transformer
        # trained on the initial VAE's latents works with the fine-tuned decoder unchanged.
        export_vae(ema_model.vae, output_dir / "final" / "vae", dataset, keep_scaling=config.freeze_encoder)
    else:
        export_transformer(ema_model, config, output_dir / "final")
    (output_dir / "final" / "train_config.json").write_text(json.dumps(config.to_dict(), indent=2))
