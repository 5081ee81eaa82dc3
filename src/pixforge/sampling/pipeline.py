"""Text to image with PixArt: small pure functions, composed by `PixArtPipeline`.

    encode_prompts     prompts (+ negatives) -> one TextEmbedding, [uncond, cond] when guided
    prepare_noise      seeds / generators -> unit noise (B, C, h, w), drawn on the CPU
    guided_model_fn    transformer + text context -> ε(x, t), CFG in one batched forward
    decode             latents -> images in [0, 1] (B, 3, H, W)

The loop itself is `samplers.sample`. Every step matches diffusers' PixArtAlphaPipeline /
PixArtSigmaPipeline where they overlap (same seed -> same latents -> same image); the
differences are deliberate: the text side of cross-attention is computed once per
generation, micro-conditions follow the model's config (not `sample_size == 128`),
binning works for any model size, and DDIM/1-step sampling follow the math
(docs/generation.md). Neither diffusers nor transformers is imported unless a component
needs them (a T5 text encoder, a diffusers-adapter sampler).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pixforge.accel.cache import (MODEL_SCHEDULES_DIR, load_model_schedules, parse_cache_spec, policy_name,
                                  schedule_guidance_scale, searched_schedule)
from pixforge.errors import CheckpointError, PixforgeError
from pixforge.models.text import (
    PIXART_ALPHA_MAX_LENGTH,
    PIXART_SIGMA_MAX_LENGTH,
    MiniLMTextEncoder,
    T5TextEncoder,
    TextEmbedding,
    TextEncoder,
)
from pixforge.models.transformer import PixArtTransformer, TextContext
from pixforge.models.vae import AutoencoderKL
from pixforge.sampling import samplers as S
from pixforge.sampling.metadata import GenerationInfo
from pixforge.sampling.regions import Layout, box_mask, compose, resolve_layouts
from pixforge.sampling.sizes import MAX_SIDE, bins_for, check_size, nearest_bin, resize_and_crop

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
PIPELINE_CLASSES = ("PixArtAlphaPipeline", "PixArtSigmaPipeline", "PixArtPipeline")
DEFAULT_GUIDANCE = 4.5
MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
OUTPUT_TYPES = ("pil", "np", "latent")
MINILM_NAMES = ("minilm", "MiniLMTextEncoder")
DIFFUSERS_VERSION_WRITTEN = "0.30.0"

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


# ------------------------------------------------------------------------------------
# Pure functions
# ------------------------------------------------------------------------------------
def encode_prompts(
    encoder: TextEncoder, prompts: list[str], negative_prompts: list[str] | None, max_length: int
) -> TextEmbedding:
    """Encode prompts (and, for guidance, their negatives first) in one encoder call.

    -> embeds (N, L, D) and mask (N, L) with N = len(prompts), or 2·len(prompts) laid out
    [negatives..., prompts...] as diffusers concatenates them. Truncations are warned about.
    """
    texts = prompts if negative_prompts is None else [*negative_prompts, *prompts]
    embedding = encoder.encode(texts, max_length=max_length)
    for text, dropped in zip(texts, embedding.num_truncated):
        if dropped:
            logger.warning(
                "prompt truncated: %d token%s beyond the %s encoder's limit of %d were dropped from %r",
                dropped, "s" if dropped > 1 else "", encoder.name, max_length, text,
            )
    return embedding


def repeat_text_context(context: TextContext, repeats: int) -> TextContext:
    """Each prompt's K/V repeated for its `repeats` images (once per generation, not per step)."""
    if repeats == 1:
        return context
    kv = [(k.repeat_interleave(repeats, 0), v.repeat_interleave(repeats, 0)) for k, v in context.kv]
    bias = None if context.bias is None else context.bias.repeat_interleave(repeats, 0)
    return TextContext(kv=kv, bias=bias)


def prepare_noise(
    shape: tuple[int, int, int, int],
    generator: torch.Generator | Sequence[torch.Generator],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Unit normal noise (B, C, h, w), float32, drawn as diffusers' `randn_tensor` draws it.

    A CPU generator draws on the CPU and the result is moved, so a seed gives the same
    noise (and image) on CPU and GPU; a list draws one batch element from each generator.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise PixforgeError(f"got {len(generator)} generators for {shape[0]} images; pass one per image")
        parts = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32) for g in generator]
        return torch.cat(parts).to(device)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)


def micro_conditions(height: int, width: int, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """PixArt-α micro-conditions in pixels: resolution (B, 2) = [h, w], aspect ratio (B, 1) = h / w."""
    resolution = torch.tensor([[float(height), float(width)]], device=device).expand(batch, 2)
    aspect_ratio = torch.tensor([[float(height / width)]], device=device).expand(batch, 1)
    return resolution, aspect_ratio


def guided_model_fn(
    transformer: PixArtTransformer,
    text_context: TextContext,
    guidance_scale: float,
    latent_channels: int,
    resolution: torch.Tensor | None = None,
    aspect_ratio: torch.Tensor | None = None,
    cache=None,
    prediction_type: str = "epsilon",
    schedule: S.ScheduleConfig = S.ScheduleConfig(),
    timesteps: torch.Tensor | None = None,
) -> S.ModelFn:
    """ε(x, t) for the sampler. With guidance (scale > 1) `text_context` is [uncond, cond]
    and both halves run in one forward; the learned-sigma channels are dropped first.

    `timesteps`: the steps the sampler will ask for, when known; on CPU their conditions are
    then computed in one batched call up front (`condition_table`) and looked up per step.
    """
    guided = guidance_scale > 1.0
    noise = S.noise_schedule(schedule)
    table = {}
    if timesteps is not None and transformer.device.type == "cpu":  # a lookup by value would sync a GPU
        table = transformer.condition_table(
            timesteps, None if resolution is None else resolution[:1], None if aspect_ratio is None else aspect_ratio[:1]
        )

    cfg_cache = guided and cache is not None and getattr(cache, "guidance", None) is not None
    if cfg_cache:  # the conditional half of everything, for the steps that skip the unconditional branch
        half = text_context.batch_size // 2
        cond_context = TextContext([(k[half:], v[half:]) for k, v in text_context.kv],
                                   None if text_context.bias is None else text_context.bias[half:])
        cond_resolution = None if resolution is None else resolution[half:]
        cond_aspect_ratio = None if aspect_ratio is None else aspect_ratio[half:]

    def eps_of(out: torch.Tensor, model_input: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = S.split_learned_sigma(out.float(), latent_channels)
        if prediction_type == "v_prediction":
            eps = S.v_to_eps(eps, model_input.float(), t, noise)
        return eps

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        condition = table.get(float(t)) if table and t.ndim == 0 else None
        if cfg_cache and cache.reuses_guidance():  # CFG-cache: ε_c + (s - 1)·(ε_c − ε_u) of the last full step
            cache.rows = slice(half, 2 * half)
            try:
                out = transformer(x, t, text_context=cond_context, resolution=cond_resolution,
                                  aspect_ratio=cond_aspect_ratio, cache=cache, condition=condition)
            finally:
                cache.rows = None
            return torch.add(eps_of(out, x, t), cache.guidance_delta, alpha=guidance_scale - 1.0)
        model_input = torch.cat([x, x]) if guided else x  # (2B | B, C, h, w)
        out = transformer(
            model_input, t, text_context=text_context, resolution=resolution, aspect_ratio=aspect_ratio,
            cache=cache, condition=condition,
        )  # (2B | B, C or 2C, h, w)
        eps = eps_of(out, model_input, t)
        if guided:
            eps_uncond, eps_cond = eps.chunk(2)
            if cfg_cache:
                cache.guidance_delta = eps_cond - eps_uncond
            eps = S.cfg_combine(eps_uncond, eps_cond, guidance_scale)
        return eps

    return model_fn


def regional_model_fn(
    plain_fn: S.ModelFn,
    all_fn: S.ModelFn,
    masks: torch.Tensor,
    regional_steps: list[int],
    guidance_scale: float,
    timesteps: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> S.ModelFn:
    """ε(x, t) with a layout: while a row is in its first `regional_steps[row]` steps, its
    conditional ε is composed region-wise (`regions.compose`), then guided; afterwards, and
    for every row once all are past their regional steps, `plain_fn`.

    `all_fn` predicts, in one forward, [uncond (with guidance), prompt] for all B rows and then
    region 0, ..., region R-1 for the S rows `rows` that have a layout (default: all B);
    masks (R, S, 1, h, w). Rows without a layout get no region rows (no wasted work in a batch
    that mixes prompts with and without one). Steps are counted by timestep when the sampler's
    timesteps are known (2nd-order samplers call twice per step), else by call.
    """
    guided = guidance_scale > 1.0
    regions = masks.shape[0]
    last = max(regional_steps)
    step_of = {} if timesteps is None else {float(t): i for i, t in enumerate(timesteps.reshape(-1).tolist())}
    counter = {"calls": 0, "step": 0}
    limits = torch.tensor(regional_steps, device=masks.device)
    if rows is not None:
        limits = limits[rows]

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if step_of and t.ndim == 0:
            counter["step"] = step_of.get(float(t), counter["step"])
        else:
            counter["step"] = counter["calls"]
        counter["calls"] += 1
        step = counter["step"]
        if step >= last:
            return plain_fn(x, t)
        selected = x if rows is None else x[rows]
        plain_copies = 2 if guided else 1
        out = all_fn(torch.cat([x] * plain_copies + [selected] * regions), t)
        batch = x.shape[0]
        prompt = out[(plain_copies - 1) * batch:plain_copies * batch]
        region_eps = out[plain_copies * batch:].reshape(regions, selected.shape[0], *out.shape[1:])
        live = masks * (step < limits).to(masks.dtype)[None, :, None, None, None]  # rows past their steps: plain
        if rows is None:
            cond = compose(prompt, region_eps, live)
        else:
            cond = prompt.clone()
            cond[rows] = compose(prompt[rows], region_eps, live)
        return S.cfg_combine(out[:batch], cond, guidance_scale) if guided else cond

    return model_fn


def prepare_layout(
    pipe: "PixArtPipeline",
    layouts: list[Layout | None],
    prompts: list[str],
    context: TextContext,
    per_prompt: int,
    steps: int,
    latent_hw: tuple[int, int],
    max_length: int,
) -> tuple[TextContext, torch.Tensor, list[int], torch.Tensor]:
    """Region prompts encoded after `context`'s rows → (all rows' context, masks (R, S, 1, h, w),
    regional steps per image row, the S image rows that have a layout — None when every row
    has one). Regions of one layout that share a prompt share a row, its mask the sum of their
    boxes' (the same ε, so the same composition: a counting layout's three "a red circle" boxes
    and its background strips cost two rows, not seven). A prompt with fewer rows than another
    gets zero masks for the rest (its own prompt stands in for the missing ones)."""
    chosen = [i for i, layout in enumerate(layouts) if layout is not None]
    grouped = []  # per chosen layout: {region prompt: [boxes]} in first-seen order
    for i in chosen:
        boxes: dict[str, list] = {}
        for region in layouts[i].regions:
            boxes.setdefault(region.prompt, []).append(region.box)
        grouped.append(boxes)
    count = max(len(boxes) for boxes in grouped)
    texts = [
        list(boxes)[r] if r < len(boxes) else prompts[i]
        for r in range(count)
        for i, boxes in zip(chosen, grouped)
    ]
    text = encode_prompts(pipe.text_encoder, texts, None, max_length).to(pipe.device)
    regions = repeat_text_context(pipe.transformer.prepare_text(text.embeds, text.mask), per_prompt)
    kv = [(torch.cat([k, rk]), torch.cat([v, rv])) for (k, v), (rk, rv) in zip(context.kv, regions.kv)]
    bias = None if context.bias is None else torch.cat([context.bias, regions.bias])
    height, width = latent_hw
    masks = torch.zeros(count, len(chosen), 1, height, width)
    for j, boxes in enumerate(grouped):
        for r, group in enumerate(boxes.values()):
            masks[r, j, 0] = sum(box_mask(box, height, width) for box in group)
    masks = masks.repeat_interleave(per_prompt, dim=1).to(pipe.device)
    regional_steps = [0 if layout is None else layout.regional_steps(steps) for layout in layouts]
    rows = None if len(chosen) == len(layouts) else torch.tensor(
        [i * per_prompt + j for i in chosen for j in range(per_prompt)], device=pipe.device
    )
    return TextContext(kv=kv, bias=bias), masks, [n for n in regional_steps for _ in range(per_prompt)], rows


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents (B, C, h, w) -> images (B, 3, h·f, w·f) in [0, 1], float32."""
    images = vae.decode(vae.unscale_latents(latents)).float()
    return (images * 0.5 + 0.5).clamp(0, 1)


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) float32 numpy."""
    return images.cpu().permute(0, 2, 3, 1).float().numpy()


def to_pil(images: np.ndarray) -> list:
    """(B, H, W, 3) in [0, 1] -> PIL images (rounded to 8 bits as diffusers does)."""
    from PIL import Image

    return [Image.fromarray(image) for image in (images * 255).round().astype("uint8")]


# ------------------------------------------------------------------------------------
# Schedulers <-> samplers
# ------------------------------------------------------------------------------------
def sampler_name(sampler: str | S.SamplerConfig) -> str:
    """Short name for metadata: 'dpm++', 'ddim', 'euler', 'euler-a', 'lcm' or the adapter name."""
    if isinstance(sampler, str):
        return sampler
    if isinstance(sampler, S.DPMSolverConfig):
        return "dpm++"
    if isinstance(sampler, S.DDIMConfig):
        return "ddim"
    if isinstance(sampler, S.EulerConfig):
        return "euler-a" if sampler.ancestral else "euler"
    return "lcm"


def _ignored(config: dict, defaults: dict, class_name: str) -> None:
    changed = [f"{key}={config[key]!r}" for key, default in defaults.items() if key in config and config[key] != default]
    if changed:
        logger.warning("%s: %s not supported by pixforge's sampler; ignored", class_name, ", ".join(changed))


def scheduler_to_sampler(config: dict) -> tuple[S.SamplerConfig, S.ScheduleConfig]:
    """A diffusers `scheduler_config.json` dict -> our sampler config and training schedule."""
    class_name = config.get("_class_name", "DPMSolverMultistepScheduler")
    if config.get("beta_schedule", "linear") != "linear" or config.get("trained_betas") is not None:
        raise CheckpointError(
            f"scheduler: beta_schedule={config.get('beta_schedule')!r} is not supported; PixArt uses 'linear'"
        )
    if config.get("prediction_type", "epsilon") not in S.PREDICTION_TYPES:
        raise CheckpointError(
            f"scheduler: prediction_type={config['prediction_type']!r} is not supported; use one of "
            f"{', '.join(S.PREDICTION_TYPES)} (PixArt predicts 'epsilon')"
        )
    schedule = S.ScheduleConfig(
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 1e-4)),
        beta_end=float(config.get("beta_end", 0.02)),
    )
    spacing = config.get("timestep_spacing", "linspace")
    offset = int(config.get("steps_offset", 0))
    extras = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
              "thresholding": False, "rescale_betas_zero_snr": False}
    if class_name == "DPMSolverMultistepScheduler":
        _ignored(config, {**extras, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
                          "use_lu_lambdas": False, "final_sigmas_type": "zero", "variance_type": None}, class_name)
        order = int(config.get("solver_order", 2))
        if order not in (1, 2):
            logger.warning("%s: solver_order=%d not supported; using 2", class_name, order)
            order = 2
        sampler = S.DPMSolverConfig(solver_order=order, timestep_spacing=spacing, steps_offset=offset)
    elif class_name == "DDIMScheduler":
        _ignored(config, extras, class_name)
        sampler = S.DDIMConfig(
            timestep_spacing=spacing, steps_offset=offset,
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
            clip_sample=bool(config.get("clip_sample", True)),
            clip_sample_range=float(config.get("clip_sample_range", 1.0)),
        )
    elif class_name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        _ignored(config, extras, class_name)
        sampler = S.EulerConfig(
            ancestral=class_name == "EulerAncestralDiscreteScheduler", timestep_spacing=spacing, steps_offset=offset
        )
    elif class_name == "LCMScheduler":
        _ignored(config, extras, class_name)
        sampler = S.LCMConfig(
            original_inference_steps=int(config.get("original_inference_steps", 50)),
            timestep_scaling=float(config.get("timestep_scaling", 10.0)),
            set_alpha_to_one=bool(config.get("set_alpha_to_one", True)),
        )
    else:
        logger.warning("scheduler %s has no pixforge sampler; using dpm++ (pass sampler=... to choose)", class_name)
        sampler = S.SAMPLERS["dpm++"]
    return sampler, schedule


def sampler_to_scheduler(sampler: S.SamplerConfig, schedule: S.ScheduleConfig) -> dict:
    """Our sampler config -> a diffusers `scheduler_config.json` dict that samples the same way."""
    common = {
        "_diffusers_version": DIFFUSERS_VERSION_WRITTEN,
        "num_train_timesteps": schedule.num_train_timesteps,
        "beta_start": schedule.beta_start,
        "beta_end": schedule.beta_end,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
    }
    if isinstance(sampler, S.DPMSolverConfig):
        return {"_class_name": "DPMSolverMultistepScheduler", **common, "algorithm_type": "dpmsolver++",
                "solver_order": sampler.solver_order, "solver_type": "midpoint", "lower_order_final": True,
                "euler_at_final": False, "timestep_spacing": sampler.timestep_spacing,
                "steps_offset": sampler.steps_offset}
    if isinstance(sampler, S.DDIMConfig):
        return {"_class_name": "DDIMScheduler", **common, "timestep_spacing": sampler.timestep_spacing,
                "steps_offset": sampler.steps_offset, "set_alpha_to_one": sampler.set_alpha_to_one,
                "clip_sample": sampler.clip_sample, "clip_sample_range": sampler.clip_sample_range}
    if isinstance(sampler, S.EulerConfig):
        name = "EulerAncestralDiscreteScheduler" if sampler.ancestral else "EulerDiscreteScheduler"
        return {"_class_name": name, **common, "timestep_spacing": sampler.timestep_spacing,
                "steps_offset": sampler.steps_offset}
    return {"_class_name": "LCMScheduler", **common, "original_inference_steps": sampler.original_inference_steps,
            "timestep_scaling": sampler.timestep_scaling, "set_alpha_to_one": sampler.set_alpha_to_one,
            "timestep_spacing": "leading", "steps_offset": 0, "clip_sample": False}


# ------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    """`images`: PIL list ("pil"), (B, H, W, 3) numpy in [0, 1] ("np") or the latents ("latent").

    `latents` always holds the final diffusion latents (B, C, h, w); `metadata` and `seeds`
    have one entry per image.
    """

    images: list | np.ndarray | torch.Tensor
    metadata: list[GenerationInfo]
    seeds: list[int]
    latents: torch.Tensor = field(repr=False)
    cache: object = field(default=None, repr=False)  # the CacheRun (MACs spent, decisions), if any


def default_model_dir() -> Path:
    """The embedded default model folder (`pixforge/assets/default/`), if it is installed."""
    folder = Path(__file__).resolve().parents[1] / "assets" / "default"
    if not (folder / MODEL_INDEX).is_file():
        raise PixforgeError(
            f"the embedded default model is not installed ({folder / MODEL_INDEX} is missing); "
            f"pass a model folder with --model DIR (a diffusers PixArt pipeline folder or a pixforge one)"
        )
    return folder


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise PixforgeError(f"{name}={value!r} is out of range: use an int in {low}..{high}")
    return int(value)


def _as_prompt_list(name: str, value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) for p in value):
        return list(value)
    raise PixforgeError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


class PixArtPipeline:
    """transformer + VAE + text encoder + default sampler; `pipe(prompt, ...)` generates.

    Build it from components, or with `PixArtPipeline.from_pretrained(folder)` (a diffusers
    PixArt-α/Σ pipeline folder or a pixforge folder); `save_pretrained` writes a folder
    that both load.
    """

    def __init__(
        self,
        transformer: PixArtTransformer,
        vae: AutoencoderKL,
        text_encoder: TextEncoder,
        sampler: str | S.SamplerConfig = S.DEFAULT_SAMPLER,
        schedule: S.ScheduleConfig = S.ScheduleConfig(),
        max_sequence_length: int | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE,
        model_name: str = "pixart",
        pipeline_class: str = "PixArtPipeline",
    ):
        config = transformer.config
        if config.in_channels != vae.config.latent_channels:
            raise PixforgeError(
                f"mismatched components: transformer in_channels={config.in_channels} but the vae has "
                f"latent_channels={vae.config.latent_channels}"
            )
        if config.caption_channels is not None and config.caption_channels != text_encoder.hidden_size:
            raise PixforgeError(
                f"mismatched components: transformer caption_channels={config.caption_channels} but the "
                f"{text_encoder.name} text encoder gives {text_encoder.hidden_size}-d embeddings"
            )
        self.transformer = transformer.eval()
        self.vae = vae.eval().set_channels_last()  # faster convolutions (AutoencoderKL.set_channels_last)
        self.text_encoder = text_encoder
        self.sampler = S.resolve_sampler(sampler)
        self.schedule = schedule
        self.max_sequence_length = max_sequence_length or text_encoder.default_max_length
        self.guidance_scale = guidance_scale
        self.model_name = model_name
        self.pipeline_class = pipeline_class
        self._model_hash: str | None = None
        self._full_precision_state: dict[str, torch.Tensor] | None = None
        self._text_encoder_folder: Path | None = None  # MiniLM weights stored in the folder, if any
        self.prediction_type = "epsilon"  # or "v_prediction" (from the scheduler config)
        # TeaCache's rescaling polynomial fitted on this model (`teacache.json` in its folder).
        self.teacache_coefficients: tuple[float, ...] | None = None
        self.cache_schedules: dict = {}  # searched schedules the model ships, usable as cache="NAME"
        # An empty-scene prompt for layout="auto"'s bands beside the objects (model_index.json
        # "_pixforge": "layout_background"); None: the objects get plain halves.
        self.layout_background: str | None = None

    # --- sizes ------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.spatial_factor

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this (VAE factor x patch size)."""
        return self.vae_scale_factor * self.transformer.config.patch_size

    @property
    def native_size(self) -> int:
        return self.transformer.config.sample_size * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    # --- precision ----------------------------------------------------------------------
    def set_precision(self, precision: str) -> torch.dtype:
        """Run the transformer in "fp32", "bf16" or "auto" (the faster one here).

        Casting down keeps a float32 copy of the weights, so switching back is exact.
        """
        from pixforge.models.precision import resolve_dtype

        dtype = resolve_dtype(precision, str(self.device.type))
        current = self.transformer.dtype
        if dtype == current:
            return dtype
        if dtype == torch.float32 and self._full_precision_state is not None:
            self.transformer.to(torch.float32)
            self.transformer.load_state_dict(self._full_precision_state)
            self._full_precision_state = None
            return dtype
        if current == torch.float32:  # kept in host memory: the device holds the cast weights only
            self._full_precision_state = {k: v.detach().to("cpu", copy=True) for k, v in self.transformer.state_dict().items()}
        self.transformer.to(dtype)
        return dtype

    # --- model identity -------------------------------------------------------------------
    @property
    def model_hash(self) -> str:
        """First 10 hex digits of a SHA-256 over the transformer's float32 weights (name + bytes).

        The weights' identity whatever the file layout (one file, shards, in memory); shown
        as A1111's "Model hash". Computed on first use (~1 s per GB of weights), then kept.
        """
        if self._model_hash is None:
            state = self._full_precision_state or self.transformer.state_dict()
            digest = hashlib.sha256()
            for name in sorted(state):
                digest.update(name.encode())
                digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
            self._model_hash = digest.hexdigest()[:10]
        return self._model_hash

    def unload_text_encoder(self) -> None:
        """Free the text encoder's weights (PixArt's T5-XXL is 4.7B parameters)."""
        self.text_encoder.unload()

    # --- generation -----------------------------------------------------------------------
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | S.SamplerConfig | None = None,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        progress: bool = True,
        callback_on_step_end: StepCallback | None = None,
        precision: str | None = None,
        use_resolution_binning: bool = False,
        max_sequence_length: int | None = None,
        free_text_encoder: bool = False,
        cache=None,
        layout=None,
    ) -> GenerationResult:
        """Generate images.

        prompt / negative_prompt: one string or one per prompt (negative default "").
        height, width: pixels (default the model's native size); multiples of VAE factor x
            patch size, unless `use_resolution_binning` generates at PixArt's nearest
            aspect-ratio bucket and resizes back.
        num_inference_steps: default 20 (4 for lcm). guidance_scale: CFG scale, default
            the cache schedule's own where it records one (a searched schedule: the scale it was
            searched at), else the pipeline's (4.5, the embedded model 2.5); <= 1 runs no
            unconditional branch. sampler: 'dpm++' (default), 'ddim',
            'euler', 'euler-a', 'lcm', a diffusers scheduler name, or a SamplerConfig;
            None uses the model folder's scheduler.
        seed: image i gets seed + i; None or -1 picks a random seed (in `.seeds`).
            `generator` (one, or one per image) is used instead when given.
        callback_on_step_end(step, timestep, latents) runs after every step.
        precision: 'fp32' | 'bf16' | 'auto' for the transformer (None keeps the current).
        free_text_encoder: unload the text encoder after encoding (saves memory; later
            calls then fail until a new pipeline is loaded).
        cache: feature caching across steps — a spec ('fora:3', 'delta-dit:...', 'toca:...',
            'teacache:0.1', 'first-block:0.05', 'late-dense:0.4'), a schedule JSON path or dict (ours or
            ECAD's), or a policy object; None = compute everything (see docs/acceleration.md).
        layout: regional prompting for the first steps (`pixforge.sampling.regions`): 'auto'
            (a spatial relation in the prompt → two halves; level with each other, background
            beside, where the model names a `layout_background`), a Layout of (prompt, box) regions,
            or one per prompt; None = plain. Not combinable with `cache` (docs/generation.md).
        """
        # 1. Check everything before any work.
        prompts = _as_prompt_list("prompt", prompt)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = _as_prompt_list("negative_prompt", negative_prompt)
            if len(negatives) != len(prompts):
                raise PixforgeError(
                    f"got {len(prompts)} prompts but {len(negatives)} negative prompts; "
                    f"pass one negative prompt, or exactly one per prompt"
                )
        per_prompt = _check_int("num_images_per_prompt", num_images_per_prompt, 1, 256)
        sampler = self.sampler if sampler is None else sampler
        if isinstance(sampler, str) and (sampler in S.DIFFUSERS_SCHEDULERS or sampler.startswith(S.DIFFUSERS_PREFIX)):
            name, config = sampler, None
        else:
            config = S.resolve_sampler(sampler)
            name = sampler_name(config)
        if num_inference_steps is None:
            num_inference_steps = S.DEFAULT_STEPS.get(name, 20)
        most = config.original_inference_steps if isinstance(config, S.LCMConfig) else MAX_STEPS
        steps = _check_int("num_inference_steps", num_inference_steps, 1, most)
        policy = parse_cache_spec(cache, self.teacache_coefficients, self.cache_schedules)
        if guidance_scale is None:  # a searched schedule's own scale, else the pipeline's
            schedule_scale = schedule_guidance_scale(policy)
            guidance = self.guidance_scale if schedule_scale is None else schedule_scale
        else:
            guidance = guidance_scale
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) or guidance < 0:
            raise PixforgeError(f"guidance_scale={guidance!r} is invalid: use a finite number >= 0 (<= 1 disables CFG)")
        guidance = float(guidance)
        if output_type not in OUTPUT_TYPES:
            raise PixforgeError(f"output_type={output_type!r} is unknown; choose one of {', '.join(OUTPUT_TYPES)}")
        height = self.native_size if height is None else height
        width = self.native_size if width is None else width
        if use_resolution_binning:
            out_height, out_width = check_size(height, width, 1, MAX_SIDE)
            height, width = nearest_bin(out_height, out_width, bins_for(self.native_size, self.size_multiple))
        else:
            out_height, out_width = height, width = check_size(height, width, self.size_multiple, MAX_SIDE)
        max_length = self.max_sequence_length if max_sequence_length is None else max_sequence_length
        total = len(prompts) * per_prompt
        seeds, generators = self._generators(seed, generator, total)
        searched = searched_schedule(policy)
        if searched is not None and searched.searched_on != self.model_hash:
            logger.warning("cache schedule %r was searched on model %s; these weights are %s, so its measured "
                           "accuracy does not carry over", searched.name, searched.searched_on, self.model_hash)
        layouts = resolve_layouts(layout, prompts, self.layout_background)
        if layouts is not None and policy is not None:
            raise PixforgeError("layout and cache cannot be combined: regional prompting needs every step computed")
        cache_run = None if policy is None else policy.start(steps, self.transformer.config.num_layers)
        if precision is not None:
            self.set_precision(precision)

        with torch.inference_mode():
            # 2. Text: encode once, project to per-block K/V once, reuse every step.
            guided = guidance > 1.0
            text = encode_prompts(self.text_encoder, prompts, negatives if guided else None, max_length)
            text = text.to(self.device)
            context = repeat_text_context(self.transformer.prepare_text(text.embeds, text.mask), per_prompt)

            # 3. Noise and micro-conditions.
            channels = self.transformer.config.in_channels
            shape = (total, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
            noise = prepare_noise(shape, generators, self.device)
            resolution = aspect_ratio = None
            if self.transformer.config.uses_micro_conditions:
                batch = 2 * total if guided else total
                resolution, aspect_ratio = micro_conditions(height, width, batch, self.device)
            plan = None if config is None else S.plan_sampling(config, steps, self.schedule)
            model_fn = guided_model_fn(
                self.transformer, context, guidance, channels, resolution, aspect_ratio, cache_run,
                self.prediction_type, self.schedule, None if plan is None else plan.timesteps,
            )
            if layouts is not None:
                all_context, masks, regional_steps, layout_rows = prepare_layout(
                    self, layouts, prompts, context, per_prompt, steps, shape[-2:], max_length
                )
                all_resolution = all_aspect = None
                if self.transformer.config.uses_micro_conditions:
                    all_resolution, all_aspect = micro_conditions(
                        height, width, all_context.batch_size, self.device
                    )
                all_fn = guided_model_fn(
                    self.transformer, all_context, 1.0, channels, all_resolution, all_aspect, None,
                    self.prediction_type, self.schedule, None if plan is None else plan.timesteps,
                )
                model_fn = regional_model_fn(
                    model_fn, all_fn, masks, regional_steps, guidance, None if plan is None else plan.timesteps,
                    layout_rows,
                )
            if free_text_encoder:  # after the layout's region prompts are encoded too
                self.unload_text_encoder()

            # 4. Denoise.
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=steps, desc="sampling", leave=False, unit="step")

            def on_step(step: int, t: torch.Tensor, x: torch.Tensor) -> None:
                if bar is not None:
                    bar.update()
                if callback_on_step_end is not None:
                    callback_on_step_end(step, t, x)

            try:
                if plan is not None:
                    latents = S.denoise(plan, model_fn, noise, generators, on_step)
                else:
                    latents = S.sample(name, model_fn, noise, steps, generators, on_step, self.schedule)
            finally:
                if bar is not None:
                    bar.close()

            # 5. Decode.
            if output_type == "latent":
                images = latents
            else:
                pixels = decode(self.vae, latents)  # (B, 3, H, W)
                if (height, width) != (out_height, out_width):
                    pixels = resize_and_crop(pixels, out_height, out_width)
                images = to_numpy(pixels)
                if output_type == "pil":
                    images = to_pil(images)

        model_hash = self.model_hash
        metadata = [
            GenerationInfo(
                prompt=prompts[i // per_prompt], negative_prompt=negatives[i // per_prompt], steps=steps,
                sampler=name, cfg_scale=guidance, seed=seeds[i], width=out_width, height=out_height,
                model_name=self.model_name, model_hash=model_hash, cache=policy_name(policy),
                layout="none" if layouts is None or layouts[i // per_prompt] is None
                else layouts[i // per_prompt].describe(),
            )
            for i in range(total)
        ]
        return GenerationResult(images=images, metadata=metadata, seeds=seeds, latents=latents, cache=cache_run)

    @staticmethod
    def _generators(seed, generator, total: int) -> tuple[list[int], torch.Generator | list[torch.Generator]]:
        """Seeds reported per image and the generator(s) to draw from."""
        if generator is not None:
            if isinstance(generator, (list, tuple)):
                if len(generator) != total:
                    raise PixforgeError(f"got {len(generator)} generators for {total} images; pass one or one per image")
                return [g.initial_seed() for g in generator], list(generator)
            return [generator.initial_seed()] * total, generator
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**32)
            logger.info("seed: %d", seed)
        base = _check_int("seed", seed, 0, MAX_SEED - total)
        seeds = [base + i for i in range(total)]
        # One CPU generator per image: image i is reproducible alone from seeds[i].
        return seeds, [torch.Generator("cpu").manual_seed(s) for s in seeds]

    # --- folders ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path: str | Path, precision: str = "fp32", device: str | torch.device = "cpu"
    ) -> "PixArtPipeline":
        """Load a diffusers PixArt-α/Σ pipeline folder or a pixforge folder, offline."""
        from pixforge.models.precision import resolve_device, resolve_dtype

        device = resolve_device(device)

        root = Path(path)
        index_path = root / MODEL_INDEX
        if not index_path.is_file():
            raise CheckpointError(
                f"{index_path} is missing: a model folder needs {MODEL_INDEX} plus transformer/, vae/ "
                f"and text_encoder/ (+ tokenizer/) subfolders, as diffusers' PixArt pipelines save them"
            )
        try:
            index = json.loads(index_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{index_path} is not valid JSON: {error}") from error
        class_name = index.get("_class_name")
        if class_name not in PIPELINE_CLASSES:
            raise CheckpointError(f"{index_path}: _class_name={class_name!r}; expected one of {', '.join(PIPELINE_CLASSES)}")
        extras = index.get("_pixforge", {})

        def component(name: str, required_file: str | None = "config.json") -> list:
            entry = index.get(name)
            if not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
                raise CheckpointError(f"{index_path} names no {name!r} component; the pipeline needs one")
            if required_file is not None and not (root / name / required_file).is_file():
                raise CheckpointError(f"model folder {root} is missing its {name!r} component ({name}/{required_file})")
            return entry

        component("transformer")
        component("vae")
        encoder_entry = component("text_encoder", None)
        dtype = resolve_dtype(precision, str(torch.device(device).type))
        # Loaded as float32 and cast afterwards (set_precision), so the exact weights stay known:
        # the model hash, save_pretrained and a later switch to fp32 do not depend on `precision`.
        transformer = PixArtTransformer.from_pretrained(root / "transformer", torch_dtype=torch.float32, device=device)
        vae = AutoencoderKL.from_pretrained(root / "vae").to(device)

        sigma = class_name == "PixArtSigmaPipeline"
        encoder_folder = None
        if encoder_entry[1] in MINILM_NAMES:
            encoder_folder = root / "text_encoder"
            if (encoder_folder / "model.safetensors").is_file():
                text_encoder = MiniLMTextEncoder.from_folder(encoder_folder, device=device)
            else:
                encoder_folder = None
                text_encoder = MiniLMTextEncoder.from_package(device=device)
        elif encoder_entry[1] == "T5EncoderModel":
            component("text_encoder")
            component("tokenizer", None)
            if not (root / "tokenizer").is_dir():
                raise CheckpointError(f"model folder {root} is missing its 'tokenizer' component (tokenizer/)")
            default_length = PIXART_SIGMA_MAX_LENGTH if sigma else PIXART_ALPHA_MAX_LENGTH
            text_encoder = T5TextEncoder.from_pretrained(root, default_max_length=default_length, device=device)
        else:
            raise CheckpointError(
                f"{index_path}: text_encoder {encoder_entry!r} is not supported; use T5EncoderModel or 'minilm'"
            )

        sampler, schedule = S.SAMPLERS[S.DEFAULT_SAMPLER], S.ScheduleConfig()
        scheduler_path = root / "scheduler" / "scheduler_config.json"
        prediction_type = "epsilon"
        if scheduler_path.is_file():
            scheduler_config = json.loads(scheduler_path.read_text())
            sampler, schedule = scheduler_to_sampler(scheduler_config)
            prediction_type = scheduler_config.get("prediction_type", "epsilon")
        guidance = extras.get("guidance_scale", 0.0 if isinstance(sampler, S.LCMConfig) else DEFAULT_GUIDANCE)
        try:
            pipe = cls(
                transformer, vae, text_encoder, sampler=sampler, schedule=schedule,
                max_sequence_length=extras.get("max_sequence_length"), guidance_scale=guidance,
                model_name=extras.get("name", root.resolve().name), pipeline_class=class_name,
            )
        except PixforgeError as error:
            raise CheckpointError(f"{root}: {error}") from None
        pipe._text_encoder_folder = encoder_folder
        pipe.prediction_type = prediction_type
        coefficients = extras.get("teacache_coefficients")
        if coefficients is not None:
            if not (isinstance(coefficients, list) and coefficients and all(isinstance(c, (int, float)) for c in coefficients)):
                raise CheckpointError(f"{index_path}: teacache_coefficients must be a list of numbers")
            pipe.teacache_coefficients = tuple(float(c) for c in coefficients)
        background = extras.get("layout_background")
        if background is not None:
            if not isinstance(background, str) or not background.strip():
                raise CheckpointError(f"{index_path}: layout_background must be a non-empty prompt")
            pipe.layout_background = background
        if (root / MODEL_SCHEDULES_DIR).is_dir():
            try:
                pipe.cache_schedules = load_model_schedules(root)
            except PixforgeError as error:
                raise CheckpointError(str(error)) from None
            layers = transformer.config.num_layers
            for name, schedule in pipe.cache_schedules.items():
                if schedule.blocks != layers:
                    raise CheckpointError(f"{root / MODEL_SCHEDULES_DIR / name}.json is for {schedule.blocks} blocks; "
                                          f"the transformer has {layers}")
        if dtype != torch.float32:
            pipe.set_precision(precision)
        return pipe

    def save_pretrained(self, path: str | Path) -> Path:
        """Write a pipeline folder: diffusers loads it when the text encoder is T5.

        model_index.json is written last, so an interrupted save is not a loadable folder.
        """
        from pixforge.models.convert import atomic_write_bytes

        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        transformer = self.transformer
        if self._full_precision_state is not None:  # save the exact float32 weights
            transformer = PixArtTransformer(self.transformer.config)
            transformer.load_state_dict(self._full_precision_state)
        transformer.save_pretrained(root / "transformer")
        self.vae.save_pretrained(root / "vae")
        index = {"_diffusers_version": DIFFUSERS_VERSION_WRITTEN}
        if isinstance(self.text_encoder, T5TextEncoder):
            self.text_encoder.module.save_pretrained(root / "text_encoder")
            self.text_encoder.tokenizer.save_pretrained(root / "tokenizer")
            sigma = self.pipeline_class == "PixArtSigmaPipeline" or (
                self.pipeline_class == "PixArtPipeline" and self.max_sequence_length == PIXART_SIGMA_MAX_LENGTH
            )
            index["_class_name"] = "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline"
            index["text_encoder"] = ["transformers", "T5EncoderModel"]
            index["tokenizer"] = ["transformers", type(self.text_encoder.tokenizer).__name__]
        elif isinstance(self.text_encoder, MiniLMTextEncoder):
            index["_class_name"] = "PixArtPipeline"
            index["text_encoder"] = ["pixforge", "minilm"]
            index["tokenizer"] = [None, None]
            source = self._text_encoder_folder
            if source is not None and source.resolve() != (root / "text_encoder").resolve():
                # Weights that are not the pip package's travel with the folder.
                (root / "text_encoder").mkdir(parents=True, exist_ok=True)
                for name in ("config.json", "model.safetensors", "tokenizer.json"):
                    shutil.copyfile(source / name, root / "text_encoder" / name)
        else:
            raise PixforgeError(f"cannot save a {type(self.text_encoder).__name__} text encoder")
        scheduler = sampler_to_scheduler(self.sampler, self.schedule)
        scheduler["prediction_type"] = self.prediction_type
        atomic_write_bytes(root / "scheduler" / "scheduler_config.json", (json.dumps(scheduler, indent=2) + "\n").encode())
        index["transformer"] = ["diffusers", "PixArtTransformer2DModel"]
        index["vae"] = ["diffusers", "AutoencoderKL"]
        index["scheduler"] = ["diffusers", scheduler["_class_name"]]
        index["_pixforge"] = {
            "name": self.model_name,
            "max_sequence_length": self.max_sequence_length,
            "guidance_scale": self.guidance_scale,
        }
        if self.teacache_coefficients is not None:
            index["_pixforge"]["teacache_coefficients"] = list(self.teacache_coefficients)
        if self.layout_background is not None:
            index["_pixforge"]["layout_background"] = self.layout_background
        for name, schedule in self.cache_schedules.items():
            (root / MODEL_SCHEDULES_DIR).mkdir(exist_ok=True)
            schedule.save(root / MODEL_SCHEDULES_DIR / f"{name}.json")
        atomic_write_bytes(root / MODEL_INDEX, (json.dumps(index, indent=2) + "\n").encode())
        return root


def load_pipeline(path: str | Path | None = None, precision: str = "fp32", device: str = "cpu") -> PixArtPipeline:
    """`PixArtPipeline.from_pretrained(path)`; no path loads the embedded default model."""
    return PixArtPipeline.from_pretrained(default_model_dir() if path is None else path, precision, device)


__all__ = [
    "PixArtPipeline",
    "GenerationResult",
    "load_pipeline",
    "default_model_dir",
    "encode_prompts",
    "prepare_noise",
    "guided_model_fn",
    "micro_conditions",
    "decode",
    "scheduler_to_sampler",
    "sampler_to_scheduler",
]
