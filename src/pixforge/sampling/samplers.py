"""Samplers as pure functions, at parity with the diffusers schedulers they replace.

PixArt is trained with DDPM's linear betas (1e-4 .. 0.02, 1000 steps) and predicts
epsilon. Every sampler here reads that one `NoiseSchedule` and is configured as PixArt
ships it:

  dpm++    DPM-Solver++ 2M, midpoint, lower-order final step (the default, 20 steps)
  ddim     DDIM (eta 0), previous timestep = the next one in the actual list
  euler    Euler (k-diffusion sigmas)
  euler-a  Euler ancestral (noise from the generator)
  lcm      LCM multistep, as PixArt-LCM ships it (4 steps, guidance 0)

Set-up (`plan_sampling`) computes every per-step coefficient once, in float32 and in the
same order of operations as diffusers, so the loop (`denoise`) is a handful of tensor
ops per step. Two diffusers behaviours are deliberately not copied (see docs/sampling.md):
DDIM's `t - T // N` previous timestep under linspace spacing (diffusers #12633, #11347),
and a 1-step linspace schedule that starts from pure noise at t = 0 (we start at T - 1).

Convention: `model_fn(x, t) -> eps` with x (B, C, H, W) already scaled for the model and
t a 0-d tensor on x's device (int64 for discrete samplers, float32 for the Euler family).
Any other diffusers scheduler is reachable by name through a thin adapter that imports
diffusers only when it is asked for.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from pixforge.errors import PixforgeError

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, torch.Tensor, torch.Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None


# ----------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class ScheduleConfig:
    """DDPM training schedule; PixArt α and Σ both use these values."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The training noise schedule, float32 like diffusers, computed once per config."""

    config: ScheduleConfig
    betas: torch.Tensor  # (T,)
    alphas_cumprod: torch.Tensor  # (T,) ᾱ_t
    sigmas: torch.Tensor  # (T,) sqrt((1 - ᾱ_t) / ᾱ_t), the k-diffusion (VE) noise level


@functools.lru_cache(maxsize=8)
def noise_schedule(config: ScheduleConfig = ScheduleConfig()) -> NoiseSchedule:
    # diffusers' "linear": a float32 linspace (not float64 then cast), so ᾱ matches bit for bit.
    betas = torch.linspace(config.beta_start, config.beta_end, config.num_train_timesteps, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return NoiseSchedule(config, betas, alphas_cumprod, sigmas)


PREDICTION_TYPES = ("epsilon", "v_prediction")


def alpha_bar_at(schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
    """ᾱ at timestep t: exact at integer t; between them (the Euler family's fractional t)
    log σ is interpolated linearly, the inverse of diffusers' sigma -> t mapping."""
    t = t.float().clamp(0, schedule.config.num_train_timesteps - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=schedule.config.num_train_timesteps - 1)
    log_sigmas = schedule.sigmas.to(t.device).log()
    w = t - low.float()
    sigma = torch.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])
    return 1.0 / (1.0 + sigma**2)


def v_to_eps(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
    """ε from a v-prediction (v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0) at the model input x_t:
    ε = sqrt(1-ᾱ) x_t + sqrt(ᾱ) v."""
    alpha_bar = alpha_bar_at(schedule, t).reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else alpha_bar_at(schedule, t)
    return (1 - alpha_bar).sqrt() * x + alpha_bar.sqrt() * v


# ----------------------------------------------------------------------------- sampler configs
@dataclass(frozen=True)
class DPMSolverConfig:
    """DPMSolverMultistepScheduler as PixArt ships it (dpmsolver++, midpoint, final sigma 0).

    PixArt's lower_order_final=True / euler_at_final=False need no fields: with a final
    sigma of 0 diffusers takes a first-order last step whatever they say, and the 2M
    solver has no third-order step for lower_order_final to demote.
    """

    solver_order: int = 2  # 1 or 2
    timestep_spacing: str = "linspace"
    steps_offset: int = 0


@dataclass(frozen=True)
class DDIMConfig:
    """Deterministic DDIM (eta 0).

    `clip_sample` defaults to False: clipping the predicted x0 to [-1, 1] is a pixel-space
    convention; diffusers' DDIMScheduler defaults it to True, which a config built with
    `DDIMScheduler.from_config(pixart_scheduler_config)` inherits.
    """

    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = False
    clip_sample_range: float = 1.0


@dataclass(frozen=True)
class EulerConfig:
    """EulerDiscreteScheduler (ancestral=False) or EulerAncestralDiscreteScheduler (True)."""

    ancestral: bool = False
    timestep_spacing: str = "linspace"
    steps_offset: int = 0


@dataclass(frozen=True)
class LCMConfig:
    """LCMScheduler as PixArt-LCM-XL-2-1024-MS ships it."""

    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    set_alpha_to_one: bool = True


SamplerConfig = DPMSolverConfig | DDIMConfig | EulerConfig | LCMConfig

SAMPLERS: dict[str, SamplerConfig] = {
    "dpm++": DPMSolverConfig(),
    "ddim": DDIMConfig(),
    "euler": EulerConfig(),
    "euler-a": EulerConfig(ancestral=True),
    "lcm": LCMConfig(),
}
DEFAULT_SAMPLER = "dpm++"
DEFAULT_STEPS = {"dpm++": 20, "ddim": 20, "euler": 20, "euler-a": 20, "lcm": 4}

# Other diffusers schedulers reachable by a short name (diffusers imported only when used).
DIFFUSERS_SCHEDULERS: dict[str, str] = {
    "sa-solver": "SASolverScheduler",
    "unipc": "UniPCMultistepScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm-sde": "DPMSolverSDEScheduler",  # needs the optional torchsde package
    "deis": "DEISMultistepScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
}
DIFFUSERS_PREFIX = "diffusers:"


def available_samplers() -> list[str]:
    """Every accepted sampler name; any `diffusers:<SchedulerClass>` is accepted too."""
    return [*SAMPLERS, *DIFFUSERS_SCHEDULERS]


def _unknown_sampler(name: object) -> PixforgeError:
    return PixforgeError(
        f"unknown sampler {name!r}; choose one of {', '.join(available_samplers())} "
        f"or '{DIFFUSERS_PREFIX}<SchedulerClass>' for any other diffusers scheduler"
    )


def resolve_sampler(sampler: str | SamplerConfig) -> SamplerConfig:
    if isinstance(sampler, (DPMSolverConfig, DDIMConfig, EulerConfig, LCMConfig)):
        return sampler
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return SAMPLERS[sampler]
    raise _unknown_sampler(sampler)


# ----------------------------------------------------------------------------- timesteps
def spaced_timesteps(num_steps: int, spacing: str, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """Descending timesteps (float64 array) for `num_steps`, as diffusers spaces them.

    Exception, following the math: a 1-step linspace schedule starts at T - 1, not at
    t = 0 (np.linspace with one point returns its start, so diffusers' DDIM and Euler
    would denoise pure noise as if it were almost clean).
    """
    last = num_train_timesteps - 1
    if spacing == "linspace":
        if num_steps == 1:
            return np.array([float(last)])
        return np.linspace(0, last, num_steps)[::-1].copy()
    if spacing == "leading":
        step_ratio = num_train_timesteps // num_steps
        return (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        step_ratio = num_train_timesteps / num_steps
        return np.arange(num_train_timesteps, 0, -step_ratio).round() - 1
    raise PixforgeError(f"unknown timestep_spacing {spacing!r}; choose one of linspace, leading, trailing")


def _dpm_timesteps(num_steps: int, config: DPMSolverConfig, num_train_timesteps: int) -> np.ndarray:
    # DPM-Solver spaces N + 1 points and drops the last (the final sigma is set to 0).
    if config.timestep_spacing == "linspace":
        return np.linspace(0, num_train_timesteps - 1, num_steps + 1).round()[::-1][:-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        step_ratio = num_train_timesteps // (num_steps + 1)
        steps = (np.arange(0, num_steps + 1) * step_ratio).round()[::-1][:-1].astype(np.int64)
        return steps + config.steps_offset
    if config.timestep_spacing == "trailing":
        step_ratio = num_train_timesteps / num_steps
        return np.arange(num_train_timesteps, 0, -step_ratio).round().astype(np.int64) - 1
    raise PixforgeError(
        f"unknown timestep_spacing {config.timestep_spacing!r}; choose one of linspace, leading, trailing"
    )


def _lcm_timesteps(num_steps: int, config: LCMConfig, num_train_timesteps: int) -> np.ndarray:
    # Evenly spaced indices into the distillation schedule (k - 1, 2k - 1, ..., T - 1).
    k = num_train_timesteps // config.original_inference_steps
    origin = (np.arange(1, config.original_inference_steps + 1) * k - 1)[::-1]
    indices = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
    return origin[indices]


def _check_steps(num_steps: object, most: int, sampler: str) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= most:
        raise PixforgeError(f"num_steps={num_steps!r} is invalid for sampler {sampler!r}: use an integer in 1..{most}")
    return int(num_steps)


# ----------------------------------------------------------------------------- plans
@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Everything a sampling loop needs, computed once for (sampler, num_steps).

    `coefficients[i]` holds the python-float scalars of step i; their meaning depends on
    `kind` (see the `_denoise_*` functions). Python floats taken from float32 values act
    exactly like the 0-d float32 tensors diffusers multiplies by.
    """

    kind: str  # "dpm++" | "ddim" | "euler" | "euler-a" | "lcm"
    timesteps: torch.Tensor  # (N,) model timesteps, int64 or float32 as diffusers passes them
    sigmas: torch.Tensor  # (N + 1,) k-diffusion noise level at each step, 0 after the last
    init_noise_sigma: float  # x_T = noise * init_noise_sigma
    input_scales: tuple[float, ...]  # model input = x / input_scales[i]  (1.0: unscaled)
    coefficients: tuple[tuple[float, ...], ...]
    clip_sample_range: float | None = None  # DDIM x0 clipping, None = off

    @property
    def num_steps(self) -> int:
        return len(self.coefficients)


def plan_sampling(
    sampler: str | SamplerConfig, num_steps: int, schedule_config: ScheduleConfig = ScheduleConfig()
) -> SamplingPlan:
    """Timesteps, sigmas and per-step coefficients for `sampler` at `num_steps` (cached)."""
    config = resolve_sampler(sampler)
    if isinstance(config, LCMConfig):
        most, name = config.original_inference_steps, "lcm"
    else:
        most = schedule_config.num_train_timesteps
        name = sampler if isinstance(sampler, str) else type(config).__name__
    # Checked before the cache: True == 1 would otherwise hit the 1-step plan.
    return _plan_cached(config, _check_steps(num_steps, most, name), schedule_config)


@functools.lru_cache(maxsize=64)
def _plan_cached(config: SamplerConfig, num_steps: int, schedule_config: ScheduleConfig) -> SamplingPlan:
    schedule = noise_schedule(schedule_config)
    if isinstance(config, DPMSolverConfig):
        return _plan_dpm(config, num_steps, schedule)
    if isinstance(config, DDIMConfig):
        return _plan_ddim(config, num_steps, schedule)
    if isinstance(config, EulerConfig):
        return _plan_euler(config, num_steps, schedule)
    return _plan_lcm(config, num_steps, schedule)


def _sigmas_at(timesteps: np.ndarray, schedule: NoiseSchedule) -> torch.Tensor:
    """(N + 1,) float32 sigmas interpolated at `timesteps`, then the final 0 (diffusers' way)."""
    table = schedule.sigmas.numpy()
    sigmas = np.interp(timesteps, np.arange(0, len(table)), table)
    return torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))


def _plan_dpm(config: DPMSolverConfig, num_steps: int, schedule: NoiseSchedule) -> SamplingPlan:
    if config.solver_order not in (1, 2):
        raise PixforgeError(f"DPM-Solver++ solver_order={config.solver_order} is not supported; use 1 or 2")
    timesteps = _dpm_timesteps(num_steps, config, schedule.config.num_train_timesteps)
    sigmas = _sigmas_at(timesteps, schedule)
    n = len(timesteps)
    # VP coefficients from sigma, in diffusers' float32 order: α = 1/sqrt(σ²+1), σ_t = σ·α.
    alpha = 1 / ((sigmas**2 + 1) ** 0.5)
    sigma_t = sigmas * alpha
    lam = torch.log(alpha) - torch.log(sigma_t)  # λ = log(α/σ_t); +inf after the last step
    coefficients = []
    for i in range(n):
        h = lam[i + 1] - lam[i]
        ratio = sigma_t[i + 1] / sigma_t[i]
        c = alpha[i + 1] * (torch.exp(-h) - 1.0)
        final = i == n - 1  # final sigma 0: the last step is always first order
        second = config.solver_order == 2 and i >= 1 and not final
        inv_r0 = 1.0 / ((lam[i] - lam[i - 1]) / h) if second else torch.tensor(0.0)
        coefficients.append(
            (float(sigma_t[i]), float(alpha[i]), float(ratio), float(c), float(0.5 * c), float(inv_r0), float(second))
        )
    return SamplingPlan(
        kind="dpm++",
        timesteps=torch.from_numpy(timesteps.astype(np.int64)),
        sigmas=sigmas,
        init_noise_sigma=1.0,
        input_scales=(1.0,) * n,
        coefficients=tuple(coefficients),
    )


def _plan_ddim(config: DDIMConfig, num_steps: int, schedule: NoiseSchedule) -> SamplingPlan:
    T = schedule.config.num_train_timesteps
    steps = spaced_timesteps(num_steps, config.timestep_spacing, T, config.steps_offset)
    timesteps = steps.round().astype(np.int64)
    ac = schedule.alphas_cumprod
    final_alpha = torch.tensor(1.0) if config.set_alpha_to_one else ac[0]
    coefficients = []
    for i, t in enumerate(timesteps):
        # The math: the previous timestep is the next entry of the list actually sampled
        # (diffusers uses t - T // N, which is only right for "leading" spacing).
        prev = int(timesteps[i + 1]) if i + 1 < len(timesteps) else -1
        alpha_t = ac[t]
        alpha_prev = ac[prev] if prev >= 0 else final_alpha
        coefficients.append(
            (
                float((1 - alpha_t) ** 0.5),  # x0 = (x - sqrt(1 - ᾱ_t)·ε) / sqrt(ᾱ_t)
                float(alpha_t**0.5),
                float(alpha_prev**0.5),  # x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 - ᾱ_prev)·ε
                float((1 - alpha_prev) ** 0.5),
            )
        )
    return SamplingPlan(
        kind="ddim",
        timesteps=torch.from_numpy(timesteps),
        sigmas=_sigmas_at(timesteps.astype(np.float64), schedule),
        init_noise_sigma=1.0,
        input_scales=(1.0,) * len(timesteps),
        coefficients=tuple(coefficients),
        clip_sample_range=config.clip_sample_range if config.clip_sample else None,
    )


def _plan_euler(config: EulerConfig, num_steps: int, schedule: NoiseSchedule) -> SamplingPlan:
    T = schedule.config.num_train_timesteps
    if config.timestep_spacing == "linspace" and num_steps > 1:
        # diffusers builds this one in float32 (the other samplers round to integers).
        timesteps = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    else:
        timesteps = spaced_timesteps(num_steps, config.timestep_spacing, T, config.steps_offset).astype(np.float32)
    sigmas = _sigmas_at(timesteps, schedule)
    sigma_max = sigmas.max()
    # diffusers' initial scale: σ_max for linspace/trailing, sqrt(σ_max² + 1) for leading.
    init = sigma_max if config.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
    coefficients = []
    for i in range(len(timesteps)):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if config.ancestral:
            sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
            sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
            coefficients.append((float(sigma), float(sigma_down - sigma), float(sigma_up)))
        else:
            coefficients.append((float(sigma), float(sigma_next - sigma)))
    return SamplingPlan(
        kind="euler-a" if config.ancestral else "euler",
        timesteps=torch.from_numpy(timesteps),
        sigmas=sigmas,
        init_noise_sigma=float(init),
        input_scales=tuple(float((s**2 + 1) ** 0.5) for s in sigmas[:-1]),
        coefficients=tuple(coefficients),
    )


def _plan_lcm(config: LCMConfig, num_steps: int, schedule: NoiseSchedule) -> SamplingPlan:
    T = schedule.config.num_train_timesteps
    if config.original_inference_steps > T:
        raise PixforgeError(f"original_inference_steps={config.original_inference_steps} must be in 1..{T}")
    timesteps = torch.from_numpy(_lcm_timesteps(num_steps, config, T))
    ac = schedule.alphas_cumprod
    final_alpha = torch.tensor(1.0) if config.set_alpha_to_one else ac[0]
    sigma_data = 0.5
    coefficients = []
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else t
        alpha_t = ac[t]
        alpha_prev = ac[prev] if prev >= 0 else final_alpha
        scaled = t * config.timestep_scaling  # consistency-model boundary condition on t·scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        coefficients.append(
            (
                float((1 - alpha_t).sqrt()),
                float(alpha_t.sqrt()),
                float(c_out),
                float(c_skip),
                float(alpha_prev.sqrt()),
                float((1 - alpha_prev).sqrt()),
            )
        )
    return SamplingPlan(
        kind="lcm",
        timesteps=timesteps,
        sigmas=_sigmas_at(timesteps.numpy().astype(np.float64), schedule),
        init_noise_sigma=1.0,
        input_scales=(1.0,) * len(timesteps),
        coefficients=tuple(coefficients),
    )


# ----------------------------------------------------------------------------- loops
def _randn_like(x: torch.Tensor, generator: Generator) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn the way diffusers' randn_tensor draws it.

    A CPU generator draws on the CPU and moves the result (same noise on CPU and GPU); a
    list of generators draws one batch element from each.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise PixforgeError(f"got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample")
        parts = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype) for g in generator]
        return torch.cat(parts).to(x.device)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def denoise(
    plan: SamplingPlan,
    model_fn: ModelFn,
    noise: torch.Tensor,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Run `plan` from unit-variance `noise` (B, C, H, W) to x_0, in float32."""
    x = noise.float() * plan.init_noise_sigma if plan.init_noise_sigma != 1.0 else noise.float()
    timesteps = plan.timesteps.to(x.device).unbind(0)  # 0-d tensors, moved once
    loop = _LOOPS[plan.kind]
    return loop(plan, model_fn, x, timesteps, generator, callback)


def _eps(model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return model_fn(x, t).float()


def _denoise_dpm(plan, model_fn, x, timesteps, generator, callback):
    previous_x0 = None
    for i, t in enumerate(timesteps):
        sigma_t, alpha_t, ratio, c, half_c, inv_r0, second = plan.coefficients[i]
        eps = _eps(model_fn, x, t)
        x0 = (x - sigma_t * eps) / alpha_t  # data prediction (DPM-Solver++)
        if second:
            # 2M midpoint: D1 = (x0_i - x0_{i-1}) / r0 extrapolates the data prediction.
            x = ratio * x - c * x0 - half_c * (inv_r0 * (x0 - previous_x0))
        else:
            x = ratio * x - c * x0
        previous_x0 = x0
        if callback is not None:
            callback(i, t, x)
    return x


def _denoise_ddim(plan, model_fn, x, timesteps, generator, callback):
    for i, t in enumerate(timesteps):
        beta_sqrt, alpha_sqrt, alpha_prev_sqrt, direction = plan.coefficients[i]
        eps = _eps(model_fn, x, t)
        x0 = (x - beta_sqrt * eps) / alpha_sqrt
        if plan.clip_sample_range is not None:
            x0 = x0.clamp(-plan.clip_sample_range, plan.clip_sample_range)
        x = alpha_prev_sqrt * x0 + direction * eps
        if callback is not None:
            callback(i, t, x)
    return x


def _denoise_euler(plan, model_fn, x, timesteps, generator, callback):
    for i, t in enumerate(timesteps):
        sigma, dt = plan.coefficients[i]
        eps = _eps(model_fn, x / plan.input_scales[i], t)
        x0 = x - sigma * eps
        x = x + ((x - x0) / sigma) * dt  # dx/dσ = (x - x0) / σ
        if callback is not None:
            callback(i, t, x)
    return x


def _denoise_euler_ancestral(plan, model_fn, x, timesteps, generator, callback):
    for i, t in enumerate(timesteps):
        sigma, dt, sigma_up = plan.coefficients[i]
        eps = _eps(model_fn, x / plan.input_scales[i], t)
        x0 = x - sigma * eps
        x = x + ((x - x0) / sigma) * dt
        # diffusers draws on the last step too (σ_up = 0 there): keep the generator stream equal.
        x = x + _randn_like(x, generator) * sigma_up
        if callback is not None:
            callback(i, t, x)
    return x


def _denoise_lcm(plan, model_fn, x, timesteps, generator, callback):
    last = len(timesteps) - 1
    for i, t in enumerate(timesteps):
        beta_sqrt, alpha_sqrt, c_out, c_skip, alpha_prev_sqrt, beta_prev_sqrt = plan.coefficients[i]
        eps = _eps(model_fn, x, t)
        x0 = (x - beta_sqrt * eps) / alpha_sqrt
        denoised = c_out * x0 + c_skip * x
        if i < last:
            # Multistep consistency sampling: re-noise the prediction to the next timestep.
            x = alpha_prev_sqrt * denoised + beta_prev_sqrt * _randn_like(denoised, generator)
        else:
            x = denoised
        if callback is not None:
            callback(i, t, x)
    return x


_LOOPS = {
    "dpm++": _denoise_dpm,
    "ddim": _denoise_ddim,
    "euler": _denoise_euler,
    "euler-a": _denoise_euler_ancestral,
    "lcm": _denoise_lcm,
}


def sample(
    sampler: str | SamplerConfig,
    model_fn: ModelFn,
    noise: torch.Tensor,
    num_steps: int,
    generator: Generator = None,
    callback: Callback | None = None,
    schedule_config: ScheduleConfig = ScheduleConfig(),
) -> torch.Tensor:
    """Sample x_0 from unit-variance `noise` (B, C, H, W) with `sampler` in `num_steps` steps.

    `generator` feeds the samplers that inject noise (euler-a, lcm, stochastic diffusers
    schedulers). `callback(step, t, x)` runs after every step.
    """
    if isinstance(sampler, str) and (sampler in DIFFUSERS_SCHEDULERS or sampler.startswith(DIFFUSERS_PREFIX)):
        return sample_with_diffusers(sampler, model_fn, noise, num_steps, generator, callback, schedule_config)
    plan = plan_sampling(sampler, num_steps, schedule_config)
    return denoise(plan, model_fn, noise, generator, callback)


# ----------------------------------------------------------------------------- guidance
def cfg_combine(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ε_u + s·(ε_c − ε_u), as one `lerp` kernel instead of three
    (equal to diffusers' three-op order up to float rounding)."""
    return torch.lerp(eps_uncond, eps_cond, scale)


def split_learned_sigma(model_output: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """Keep ε from a learned-sigma output (B, 2C, H, W) → (B, C, H, W); pass (B, C, H, W) through."""
    channels = model_output.shape[1]
    if channels == latent_channels:
        return model_output
    if channels == 2 * latent_channels:
        return model_output[:, :latent_channels]
    raise PixforgeError(
        f"model output has {channels} channels; expected {latent_channels} (ε) or {2 * latent_channels} (ε + learned sigma)"
    )


# ----------------------------------------------------------------------------- diffusers adapter
def _diffusers_scheduler_class(name: str):
    class_name = name[len(DIFFUSERS_PREFIX) :] if name.startswith(DIFFUSERS_PREFIX) else DIFFUSERS_SCHEDULERS[name]
    import diffusers  # deliberately lazy: ~2-5 s, never on the default path

    cls = getattr(diffusers, class_name, None)
    if cls is None or not (isinstance(cls, type) and hasattr(cls, "set_timesteps") and hasattr(cls, "step")):
        raise PixforgeError(f"{name!r}: diffusers has no scheduler class {class_name!r}")
    return cls


def diffusers_scheduler(name: str, schedule_config: ScheduleConfig = ScheduleConfig()):
    """A diffusers scheduler for `name`, configured with PixArt's schedule and spacing."""
    cls = _diffusers_scheduler_class(name)
    wanted = {
        "num_train_timesteps": schedule_config.num_train_timesteps,
        "beta_start": schedule_config.beta_start,
        "beta_end": schedule_config.beta_end,
        "beta_schedule": "linear",
        "prediction_type": "epsilon",
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    accepted = inspect.signature(cls.__init__).parameters
    try:
        return cls(**{key: value for key, value in wanted.items() if key in accepted})
    except ImportError as error:  # e.g. DPMSolverSDEScheduler without torchsde
        raise PixforgeError(f"sampler {name!r} needs an optional package: {error}") from error


def sample_with_diffusers(
    name: str,
    model_fn: ModelFn,
    noise: torch.Tensor,
    num_steps: int,
    generator: Generator = None,
    callback: Callback | None = None,
    schedule_config: ScheduleConfig = ScheduleConfig(),
) -> torch.Tensor:
    """The same loop as `denoise`, driven by a diffusers scheduler (set_timesteps, scale, step)."""
    _check_steps(num_steps, schedule_config.num_train_timesteps, name)
    scheduler = diffusers_scheduler(name, schedule_config)
    scheduler.set_timesteps(num_steps, device=noise.device)
    step_accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if step_accepts_generator else {}
    x = noise.float() * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        eps = _eps(model_fn, scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, return_dict=False, **extra)[0].float()
        if callback is not None:
            callback(i, t, x)
    return x


__all__ = [
    "ScheduleConfig",
    "NoiseSchedule",
    "noise_schedule",
    "DPMSolverConfig",
    "DDIMConfig",
    "EulerConfig",
    "LCMConfig",
    "SAMPLERS",
    "DEFAULT_SAMPLER",
    "DEFAULT_STEPS",
    "DIFFUSERS_SCHEDULERS",
    "available_samplers",
    "resolve_sampler",
    "spaced_timesteps",
    "SamplingPlan",
    "plan_sampling",
    "denoise",
    "sample",
    "sample_with_diffusers",
    "diffusers_scheduler",
    "cfg_combine",
    "split_learned_sigma",
]

