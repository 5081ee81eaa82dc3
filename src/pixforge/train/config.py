"""Training configuration: one frozen dataclass; CLI flags and TOML/JSON files map onto it 1:1."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from pixforge.errors import PixforgeError

TARGETS = ("transformer", "vae")
TIMESTEP_SAMPLING = ("uniform", "logit-normal")
LOSS_WEIGHTING = ("none", "min-snr")
PRECISIONS = ("fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")

# Changing these on resume changes the run itself: refuse. Others (steps, logging, checkpoint
# cadence, output paths) may change between invocations of the same run.
_RUN_IDENTITY = (
    "target", "data", "model", "vae", "vae_channels", "text_encoder", "max_text_tokens", "resolution",
    "buckets", "crop_size", "num_samples", "paraphrase", "batch_size", "grad_accum", "lr", "weight_decay",
    "betas", "warmup_steps", "grad_clip", "ema_decay", "learned_sigma_loss", "timestep_sampling",
    "loss_weighting", "min_snr_gamma", "caption_dropout", "precision", "seed", "kl_weight", "distributed",
    "background_prob", "category_mix", "vae_init", "freeze_encoder", "prediction_type", "timestep_range",
    "x0_weight_floor", "loss_weight_cap",
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. `output_dir` holds checkpoints, logs and samples."""

    output_dir: str = "runs/default"
    target: str = "transformer"          # transformer | vae
    # --- data -----------------------------------------------------------------------
    data: str = "shapes"                 # "shapes" or an imagefolder with metadata.jsonl
    num_samples: int = 50_000            # shapes world: size of the training set (train split)
    paraphrase: float = 0.3              # shapes world: fraction of samples with paraphrased captions
    resolution: int = 128                # square side; buckets keep about this area
    buckets: bool = True                 # multi-aspect buckets (every batch one size)
    crop_size: int = 0                   # vae: random square crops of this side (0 = whole image)
    background_prob: float = 0.0         # shapes world: chance a non-background scene also names a background
    category_mix: str = ""               # shapes world: category weights, e.g. "position=3,counting=2" (others 1)
    # --- model ----------------------------------------------------------------------
    model: str = "shapes-10m"            # transformer preset name or checkpoint path
    vae: str = ""                        # transformer: trained VAE folder (latents come from it)
    vae_channels: tuple[int, ...] = (32, 64, 128, 128)  # vae: block_out_channels (f8 with 4 blocks)
    vae_init: str = ""                   # vae: start from this trained VAE folder
    freeze_encoder: bool = False         # vae: train the decoder only (latents stay valid)
    text_encoder: str = "minilm"         # "minilm" or a T5 folder
    max_text_tokens: int = 24
    # --- optimisation ---------------------------------------------------------------
    steps: int = 1000
    batch_size: int = 32                 # global batch per optimizer step (split across ranks)
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    # Warmup-stable-decay: the LR falls linearly to 0 over the last `cooldown_steps` of `steps`.
    # Not part of the run identity, so a run can be extended, then cooled down on resume.
    cooldown_steps: int = 0
    cooldown_fraction: float = 0.0       # > 0: the cool-down is this fraction of the steps (overrides cooldown_steps)
    # > 0: this invocation trains for about this many minutes of wall time (from its first step):
    # the step count is re-estimated from the measured rate (at most `steps`) until the
    # cool-down begins, then frozen. For GPU recipes whose speed is not known in advance.
    time_budget_minutes: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "fp32"              # autocast: fp32 | bf16
    compile: bool = False                # torch.compile the training step (+12-13% samples/s on shapes-10m here)
    # --- objective (transformer): ε-prediction on the DDPM linear schedule ---------------
    prediction_type: str = "epsilon"     # epsilon (PixArt) | v_prediction
    learned_sigma_loss: bool = True      # IDDPM hybrid: + VLB on the learned variance
    timestep_sampling: str = "uniform"   # uniform | logit-normal
    timestep_range: tuple = (0, 1000)    # [low, high) of the training timesteps (e.g. (300, 1000): the layout-deciding ones)
    loss_weighting: str = "none"         # none | min-snr
    min_snr_gamma: float = 5.0
    # Floor on the weight a sample's x0 error gets (ε-MSE weighs it by snr, min-SNR by min(snr, γ):
    # ~1e-3 at the layout-deciding noise levels). 0: off. `loss_weight_cap` bounds the resulting
    # weight of the ε/v-MSE term, where snr -> 0 (0: no cap).
    x0_weight_floor: float = 0.0
    loss_weight_cap: float = 0.0
    caption_dropout: float = 0.1
    # --- objective (vae) ------------------------------------------------------------
    kl_weight: float = 1e-6
    # --- bookkeeping ----------------------------------------------------------------
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200          # steps
    checkpoint_minutes: float = 10.0     # also checkpoint when this much wall time passed
    keep_last: int = 2
    sample_every: int = 0                # transformer: steps between sample grids (0 = never)
    sample_prompts: tuple[str, ...] = (
        "a red circle", "three blue squares", "a green triangle to the left of a yellow circle",
        "a pink square on a black background",
    )
    distributed: str = "ddp"             # ddp | fsdp (when launched with several processes)
    num_workers: int = 0                 # processes rendering/decoding images for the feature cache

    def __post_init__(self) -> None:
        for name in ("vae_channels", "betas", "sample_prompts", "timestep_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        checks = [
            (self.target in TARGETS, f"target={self.target!r}; choose {TARGETS}"),
            (self.timestep_sampling in TIMESTEP_SAMPLING, f"timestep_sampling={self.timestep_sampling!r}; choose {TIMESTEP_SAMPLING}"),
            (len(self.timestep_range) == 2 and all(isinstance(v, int) for v in self.timestep_range)
             and 0 <= self.timestep_range[0] < self.timestep_range[1] <= 1000,
             f"timestep_range={list(self.timestep_range)} must be [low, high) integers with 0 <= low < high <= 1000"),
            (self.x0_weight_floor >= 0 and self.loss_weight_cap >= 0,
             f"x0_weight_floor={self.x0_weight_floor} and loss_weight_cap={self.loss_weight_cap} must be >= 0"),
            (self.loss_weighting in LOSS_WEIGHTING, f"loss_weighting={self.loss_weighting!r}; choose {LOSS_WEIGHTING}"),
            (self.prediction_type in ("epsilon", "v_prediction"), f"prediction_type={self.prediction_type!r}; choose epsilon or v_prediction"),
            (self.precision in PRECISIONS, f"precision={self.precision!r}; choose {PRECISIONS}"),
            (self.distributed in DISTRIBUTED, f"distributed={self.distributed!r}; choose {DISTRIBUTED}"),
            (self.steps >= 1, f"steps={self.steps} must be >= 1"),
            (self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1"),
            (self.grad_accum >= 1, f"grad_accum={self.grad_accum} must be >= 1"),
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (0 <= self.cooldown_steps <= self.steps, f"cooldown_steps={self.cooldown_steps} must be in [0, steps={self.steps}]"),
            (0.0 <= self.cooldown_fraction <= 1.0, f"cooldown_fraction={self.cooldown_fraction} must be in [0, 1]"),
            (self.time_budget_minutes >= 0.0, f"time_budget_minutes={self.time_budget_minutes} must be >= 0"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay={self.ema_decay} must be in [0, 1)"),
            (0.0 <= self.caption_dropout <= 1.0, f"caption_dropout={self.caption_dropout} must be in [0, 1]"),
            (0.0 <= self.paraphrase <= 1.0, f"paraphrase={self.paraphrase} must be in [0, 1]"),
            (0.0 <= self.background_prob <= 1.0, f"background_prob={self.background_prob} must be in [0, 1]"),
            (not self.freeze_encoder or bool(self.vae_init), "freeze_encoder needs vae_init (a trained VAE to keep the encoder of)"),
            (self.resolution % 16 == 0 and self.resolution >= 32, f"resolution={self.resolution} must be a multiple of 16, >= 32"),
            (self.keep_last >= 1, f"keep_last={self.keep_last} must be >= 1"),
            (self.num_samples >= 1, f"num_samples={self.num_samples} must be >= 1"),
            (self.crop_size % 8 == 0, f"crop_size={self.crop_size} must be a multiple of 8"),
            (self.target != "transformer" or bool(self.vae), "target=transformer needs vae= a trained VAE folder"),
        ]
        if self.category_mix:
            from pixforge.shapes.world import parse_mix

            checks.append((self.data == "shapes", f"category_mix weights the shapes world; data={self.data!r} is a folder"))
            try:
                parse_mix(self.category_mix)
            except PixforgeError as error:
                checks.append((False, f"category_mix: {error}"))
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise PixforgeError("invalid training config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def identity(self) -> dict:
        """The fields that define the run (compared on resume)."""
        data = self.to_dict()
        return {k: data[k] for k in _RUN_IDENTITY}

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def load_config_file(path: str | Path) -> dict:
    """A TOML or JSON file whose keys are TrainConfig fields."""
    path = Path(path)
    if not path.is_file():
        raise PixforgeError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
    elif path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError as error:  # Python 3.10
            raise PixforgeError("TOML configs need Python >= 3.11; use a .json config") from error
        data = tomllib.loads(text)
    else:
        raise PixforgeError(f"config file {path} must be .toml or .json")
    unknown = sorted(set(data) - set(config_fields()))
    if unknown:
        raise PixforgeError(f"unknown training config fields in {path}: {', '.join(unknown)}")
    return data


def differing_fields(saved: dict, current: dict) -> list[str]:
    """Identity fields that differ; a field newer than the checkpoint counts as its default."""
    defaults = {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                for f in dataclasses.fields(TrainConfig)}
    return sorted(k for k in set(saved) | set(current) if saved.get(k, defaults.get(k)) != current.get(k, defaults.get(k)))
