"""Samplers: parity with the diffusers schedulers, and the math where diffusers is wrong."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pixforge.errors import PixforgeError
from pixforge.sampling import samplers as S

SHAPE = (2, 4, 8, 8)
BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic smooth ε-model: a fixed channel mix of x, squashed, plus a t term."""
    mix = torch.tensor(
        [[0.9, 0.1, -0.2, 0.05], [0.0, 0.8, 0.3, -0.1], [0.2, -0.1, 0.7, 0.0], [0.1, 0.0, 0.1, 0.95]]
    )
    mixed = torch.einsum("oc,bchw->bohw", mix, x)
    return torch.tanh(mixed) + 0.1 * torch.sin(t.float() / 150.0)


def noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def diffusers_scheduler(name: str):
    import diffusers

    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(
            **BETAS,
            algorithm_type="dpmsolver++",
            solver_order=2,
            solver_type="midpoint",
            lower_order_final=True,
            euler_at_final=False,
            timestep_spacing="linspace",
            steps_offset=0,
            prediction_type="epsilon",
        )
    if name == "ddim-leading":
        return diffusers.DDIMScheduler(**BETAS, timestep_spacing="leading", clip_sample=False, set_alpha_to_one=True)
    if name == "ddim-leading-clip-offset":
        return diffusers.DDIMScheduler(**BETAS, timestep_spacing="leading", clip_sample=True, steps_offset=1)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    if name == "euler-leading":
        return diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="leading", steps_offset=1)
    if name == "euler-a":
        return diffusers.EulerAncestralDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    if name == "lcm":
        return diffusers.LCMScheduler(**BETAS, original_inference_steps=50, timestep_scaling=10.0)
    raise KeyError(name)


OURS = {
    "dpm++": "dpm++",
    "ddim-leading": S.DDIMConfig(timestep_spacing="leading"),
    "ddim-leading-clip-offset": S.DDIMConfig(timestep_spacing="leading", clip_sample=True, steps_offset=1),
    "euler": "euler",
    "euler-leading": S.EulerConfig(timestep_spacing="leading", steps_offset=1),
    "euler-a": "euler-a",
    "lcm": "lcm",
}


def diffusers_loop(name: str, num_steps: int, x_T: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(num_steps)
    generator = torch.Generator().manual_seed(seed)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = fake_model(scheduler.scale_model_input(x, t), t)
        kwargs = {"generator": generator} if name in ("euler-a", "lcm") else {}
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x, scheduler.timesteps


PARITY_CASES = [
    (name, steps)
    for name in OURS
    for steps in ((4, 1, 2, 7) if name == "lcm" else (20, 1, 2, 7))
    # 1-step linspace Euler: diffusers starts at t = 0 (see test_one_step_*); compared to the formula instead.
    if not (steps == 1 and name in ("euler", "euler-a"))
]


@pytest.mark.parametrize("name,steps", PARITY_CASES)
def test_sampler_matches_the_diffusers_scheduler_loop(name, steps):
    x_T = noise(1)
    expected, expected_timesteps = diffusers_loop(name, steps, x_T, seed=7)
    plan = S.plan_sampling(OURS[name], steps)
    got = S.denoise(plan, fake_model, x_T, generator=torch.Generator().manual_seed(7))
    assert plan.timesteps.tolist() == expected_timesteps.tolist()
    assert plan.timesteps.dtype == expected_timesteps.dtype
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["euler", "euler-a", "dpm++"])
def test_sigmas_equal_diffusers(name):
    scheduler = diffusers_scheduler(name)
    scheduler.set_timesteps(20)
    plan = S.plan_sampling(name, 20)
    torch.testing.assert_close(plan.sigmas, scheduler.sigmas, rtol=0, atol=0)
    assert plan.init_noise_sigma == float(scheduler.init_noise_sigma)


def test_euler_a_draws_its_noise_from_the_generator():
    x_T = noise(1)
    first = S.sample("euler-a", fake_model, x_T, 5, generator=torch.Generator().manual_seed(3))
    again = S.sample("euler-a", fake_model, x_T, 5, generator=torch.Generator().manual_seed(3))
    other = S.sample("euler-a", fake_model, x_T, 5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, again)
    assert (first - other).abs().max().item() > 1e-3


def test_a_list_of_generators_seeds_each_batch_element():
    x_T = noise(1)
    together = S.sample("lcm", fake_model, x_T, 4, generator=[torch.Generator().manual_seed(s) for s in (5, 6)])
    alone = S.sample("lcm", fake_model, x_T[1:], 4, generator=[torch.Generator().manual_seed(6)])
    assert torch.equal(together[1:], alone)


# ----------------------------------------------------------------------------- the math
def oracle_model(x0: torch.Tensor, schedule: S.NoiseSchedule):
    """The exact ε of a point mass at x0: ε = (x_t − sqrt(ᾱ_t)·x0) / sqrt(1 − ᾱ_t), for any t."""
    sigmas = schedule.sigmas.double().numpy()

    def model_fn(x, t):
        # Fractional t (Euler's linspace) reads σ(t) the samplers' way: interpolated sigma.
        sigma = float(np.interp(t.item(), np.arange(len(sigmas)), sigmas))
        alpha = torch.tensor(1.0 / (1.0 + sigma**2), dtype=torch.float64)
        return ((x.double() - alpha.sqrt() * x0.double()) / (1 - alpha).sqrt()).float()

    return model_fn


@pytest.mark.parametrize("name", list(S.SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_every_sampler_recovers_the_point_mass_its_exact_denoiser_describes(name, steps):
    steps = min(steps, 4) if name == "lcm" else steps
    x0 = 0.5 * noise(2)
    model_fn = oracle_model(x0, S.noise_schedule())
    got = S.sample(name, model_fn, noise(3), steps, generator=torch.Generator().manual_seed(0))
    assert (got - x0).abs().max().item() <= 2e-4


def test_ddim_linspace_steps_to_the_next_timestep_of_its_own_list():
    """Against the DDIM formula (Song et al. eq. 12, η = 0) on the list actually sampled."""
    steps = 7
    timesteps = np.linspace(0, 999, steps).round()[::-1].astype(np.int64)  # [999, 832, ..., 0]
    ac = S.noise_schedule().alphas_cumprod.double()
    x = noise(1).double()
    for i, t in enumerate(timesteps):
        eps = fake_model(x.float(), torch.tensor(t)).double()
        x0 = (x - (1 - ac[t]).sqrt() * eps) / ac[t].sqrt()
        alpha_prev = ac[timesteps[i + 1]] if i + 1 < steps else torch.tensor(1.0, dtype=torch.float64)
        x = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps
    plan = S.plan_sampling("ddim", steps)
    assert plan.timesteps.tolist() == timesteps.tolist()
    got = S.denoise(plan, fake_model, noise(1))
    # This fake model's x0 predictions reach ~100 (157× its output at t = 999): relative check.
    assert (got.double() - x).abs().max().item() <= 1e-6 * x.abs().max().item()


def test_ddim_linspace_differs_from_the_stride_diffusers_uses():
    """diffusers' `t - T // N` (#12633) would give 857 after 999 at 7 steps; the list says 832."""
    plan = S.plan_sampling("ddim", 7)
    assert plan.timesteps[:2].tolist() == [999, 832]
    alpha_next = S.noise_schedule().alphas_cumprod[832]
    assert plan.coefficients[0][2] == pytest.approx(float(alpha_next.sqrt()), rel=1e-7)


def one_step_formula(name: str, x_T: torch.Tensor) -> torch.Tensor:
    """x_0 after one step from t = 999: the sampler's x0 prediction (its last step is exact)."""
    ac = S.noise_schedule().alphas_cumprod.double()[999]
    t = torch.tensor(999)
    if name in ("euler", "euler-a"):
        sigma = ((1 - ac) / ac).sqrt()
        x = x_T.double() * sigma  # linspace: init_noise_sigma = σ_max
        eps = fake_model((x / (sigma**2 + 1).sqrt()).float(), t.float()).double()
        return x - sigma * eps
    eps = fake_model(x_T, t).double()
    x0 = (x_T.double() - (1 - ac).sqrt() * eps) / ac.sqrt()
    if name == "lcm":
        scaled = 999 * 10.0
        return scaled / (scaled**2 + 0.25) ** 0.5 * x0 + 0.25 / (scaled**2 + 0.25) * x_T.double()
    return x0


@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_one_step_sampling_is_the_x0_prediction_at_the_last_train_timestep(name):
    plan = S.plan_sampling(name, 1)
    assert plan.timesteps.tolist() == [999]
    x_T = noise(1)
    got = S.denoise(plan, fake_model, x_T, generator=torch.Generator().manual_seed(0)).double()
    expected = one_step_formula(name, x_T)
    # x0 predictions at t = 999 are ~157× the model output: compare relative to that scale.
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_timestep_lists_equal_diffusers_for_many_step_counts():
    for steps in (1, 3, 10, 25, 50, 999):
        for name in ("dpm++", "ddim-leading", "euler-leading"):
            scheduler = diffusers_scheduler(name)
            scheduler.set_timesteps(steps)
            assert S.plan_sampling(OURS[name], steps).timesteps.tolist() == scheduler.timesteps.tolist()
    for steps in range(1, 51, 7):
        scheduler = diffusers_scheduler("lcm")
        scheduler.set_timesteps(steps)
        assert S.plan_sampling("lcm", steps).timesteps.tolist() == scheduler.timesteps.tolist()
    for steps in (2, 13, 20):
        import diffusers

        for cls in (diffusers.DDIMScheduler, diffusers.EulerDiscreteScheduler):
            scheduler = cls(**BETAS, timestep_spacing="linspace")
            scheduler.set_timesteps(steps)
            name = "ddim" if cls is diffusers.DDIMScheduler else "euler"
            assert S.plan_sampling(name, steps).timesteps.tolist() == scheduler.timesteps.tolist()


def test_callback_sees_every_step_and_the_final_sample():
    seen = []
    result = S.sample("dpm++", fake_model, noise(1), 5, callback=lambda i, t, x: seen.append((i, int(t), x)))
    assert [i for i, _, _ in seen] == list(range(5))
    assert [t for _, t, _ in seen] == S.plan_sampling("dpm++", 5).timesteps.tolist()
    assert torch.equal(seen[-1][2], result)


# ----------------------------------------------------------------------------- names and errors
def test_available_samplers_lists_ours_first_then_the_adapters():
    names = S.available_samplers()
    assert names[:5] == ["dpm++", "ddim", "euler", "euler-a", "lcm"]
    assert "sa-solver" in names and "unipc" in names


def test_an_unknown_sampler_name_is_rejected_with_the_choices():
    with pytest.raises(PixforgeError, match=r"unknown sampler 'dpm\+\+3'.*dpm\+\+, ddim, euler, euler-a, lcm"):
        S.sample("dpm++3", fake_model, noise(), 20)


@pytest.mark.parametrize("sampler,steps", [("dpm++", 0), ("ddim", 1001), ("lcm", 51), ("euler", 2.5), ("euler", True)])
def test_a_step_count_outside_the_range_is_rejected(sampler, steps):
    with pytest.raises(PixforgeError, match=r"num_steps=.* use an integer in 1\.\."):
        S.plan_sampling(sampler, steps)


def test_an_unknown_diffusers_class_is_rejected():
    with pytest.raises(PixforgeError, match="no scheduler class 'NoSuchScheduler'"):
        S.sample("diffusers:NoSuchScheduler", fake_model, noise(), 4)


def test_the_unipc_adapter_runs_the_diffusers_scheduler_with_pixart_settings():
    import diffusers

    x_T = noise(1)
    scheduler = diffusers.UniPCMultistepScheduler(**BETAS, timestep_spacing="linspace", prediction_type="epsilon")
    scheduler.set_timesteps(6)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    got = S.sample("unipc", fake_model, x_T, 6)
    assert (got - x).abs().max().item() <= 1e-6


def test_the_generic_diffusers_prefix_reaches_any_scheduler_class():
    got = S.sample("diffusers:HeunDiscreteScheduler", oracle_model(0.5 * noise(2), S.noise_schedule()), noise(3), 5)
    assert (got - 0.5 * noise(2)).abs().max().item() <= 1e-3


def test_the_default_sampling_path_does_not_import_diffusers():
    code = (
        "import sys, torch\n"
        "from pixforge.sampling.samplers import sample\n"
        "for name in ('dpm++', 'ddim', 'euler', 'euler-a', 'lcm'):\n"
        "    sample(name, lambda x, t: 0.1 * x, torch.randn(1, 4, 4, 4), 2)\n"
        "bad = [m for m in ('diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- guidance helpers
def test_cfg_combine_is_uncond_plus_scale_times_the_difference():
    uncond, cond = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    assert S.cfg_combine(uncond, cond, 4.5).tolist() == [10.0, 7.0]
    assert torch.equal(S.cfg_combine(uncond, cond, 1.0), cond)


def test_split_learned_sigma_keeps_the_first_latent_channels():
    out = torch.arange(2 * 8 * 2 * 2, dtype=torch.float32).reshape(2, 8, 2, 2)
    assert torch.equal(S.split_learned_sigma(out, 4), out[:, :4])
    assert torch.equal(S.split_learned_sigma(out[:, :4], 4), out[:, :4])
    with pytest.raises(PixforgeError, match="6 channels; expected 4"):
        S.split_learned_sigma(out[:, :6], 4)


# --------------------------------------------------------------------------- v-prediction
@pytest.mark.parametrize("name", ["dpm++", "ddim-leading", "euler"])
def test_v_prediction_through_eps_conversion_matches_diffusers_v_schedulers(name):
    """A v-model run through our ε samplers (v -> ε at the model input) equals diffusers'
    scheduler configured with prediction_type='v_prediction' stepping on the raw v."""
    scheduler = diffusers_scheduler(name)
    scheduler.register_to_config(prediction_type="v_prediction")
    steps = 7
    scheduler.set_timesteps(steps)
    x_T = noise(2)
    x = x_T * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(fake_model(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    schedule = S.noise_schedule()

    def eps_model(x, t):
        return S.v_to_eps(fake_model(x, t), x, t, schedule)

    got = S.denoise(S.plan_sampling(OURS[name], steps), eps_model, x_T)
    assert (got - x).abs().max().item() <= 1e-4


def test_v_to_eps_inverts_the_forward_process():
    schedule = S.noise_schedule()
    x0, eps = noise(3), noise(4)
    for t in (0, 10, 500, 999):
        ab = schedule.alphas_cumprod[t]
        x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
        torch.testing.assert_close(S.v_to_eps(v, x_t, torch.tensor(t), schedule), eps, atol=1e-5, rtol=0)
        assert S.alpha_bar_at(schedule, torch.tensor(float(t))).item() == pytest.approx(ab.item(), rel=1e-5)
