"""Feature caching (pixforge.accel.cache): the schedule format, each policy's reuse pattern and
equivalences, exact MAC accounting against torch's FLOP counter, pipeline and CLI wiring."""
import json

import numpy as np
import pytest
import torch
from helpers.tiny_transformer import random_transformer
from torch.utils.flop_counter import FlopCounterMode

from pixforge.accel import cache as C
from pixforge.errors import PixforgeError

STEPS = 7


def denoise(model, cache=None, steps=STEPS, batch=2, size=8, text_len=5, seed=0):
    """A fixed stand-in for a sampler: the same inputs every call, one forward per step."""
    g = torch.Generator().manual_seed(seed)
    channels = model.config.in_channels
    x = torch.randn(batch, channels, size, size, generator=g)
    text = torch.randn(batch, text_len, model.config.caption_channels, generator=g)
    mask = torch.ones(batch, text_len)
    mask[0, -2:] = 0
    extra = {}
    if model.config.uses_micro_conditions:
        extra = {"resolution": torch.full((batch, 2), 64.0), "aspect_ratio": torch.ones(batch, 1)}
    run = None if cache is None else C.parse_cache_spec(cache).start(steps, model.config.num_layers)
    outputs = []
    with torch.no_grad():
        context = model.prepare_text(text, mask)
        for step in range(steps):
            t = torch.full((batch,), 999.0 - step * (999 / steps))
            out = model(x, t, text_context=context, cache=run, **extra)
            outputs.append(out)
            x = x - 0.1 * out[:, :channels]  # the input moves between steps, as in sampling
    return outputs, run


@pytest.fixture(scope="module")
def model():
    return random_transformer("tiny", num_layers=4)


# --------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("reuse", ["gated", "delta"])
def test_all_compute_schedule_is_bit_identical_to_no_cache(model, reuse):
    reference, _ = denoise(model)
    schedule = C.CacheSchedule(np.ones((STEPS, 4, 3), bool), block_reuse=reuse)
    cached, run = denoise(model, schedule)
    assert all(torch.equal(a, b) for a, b in zip(reference, cached))
    assert run.macs_spent == run.macs_full


def test_fora_1_teacache_0_first_block_0_equal_no_cache(model):
    reference, _ = denoise(model)
    for spec in ("fora:1", "teacache:0", "first-block:0", "late-dense:1"):
        cached, run = denoise(model, spec)
        assert all(torch.equal(a, b) for a, b in zip(reference, cached)), spec


def test_toca_with_ratio_1_equals_no_cache_through_the_token_path(model):
    reference, _ = denoise(model)
    cached, run = denoise(model, "toca:interval=3,ratio=1.0")
    for a, b in zip(reference, cached):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert run.macs_spent == run.macs_full


def test_caching_changes_outputs_only_on_reuse_steps(model):
    reference, _ = denoise(model)
    cached, _ = denoise(model, "fora:3")
    for step, (a, b) in enumerate(zip(reference, cached)):
        if step == 0:
            assert torch.equal(a, b)
        else:  # inputs differ from step 1 on (the reused step moved x)
            assert not torch.equal(a, b)


# --------------------------------------------------------------------------- reuse patterns
def count_calls(model):
    counts = []

    def hook(module, args, output):
        counts[-1][module._cache_name] += 1

    handles = []
    for b, block in enumerate(model.transformer_blocks):
        for name in ("attn1", "attn2", "ff"):
            module = getattr(block, name)
            module._cache_name = name
            handles.append(module.register_forward_hook(hook))
    return counts, handles


def test_fora_computes_every_component_exactly_on_every_nth_step(model):
    schedule = C.Fora(3).schedule(STEPS, 4)
    assert schedule.compute[[0, 3, 6]].all() and not schedule.compute[[1, 2, 4, 5]].any()
    counts, handles = count_calls(model)
    run = C.Fora(3).start(STEPS, 4)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, model.config.caption_channels, generator=g)
    with torch.no_grad():
        context = model.prepare_text(text)
        for step in range(STEPS):
            counts.append({"attn1": 0, "attn2": 0, "ff": 0})
            model(x, torch.tensor([500.0]), text_context=context, cache=run)
    for handle in handles:
        handle.remove()
    for step, per in enumerate(counts):
        expected = 4 if step % 3 == 0 else 0
        assert per == {"attn1": expected, "attn2": expected, "ff": expected}, step


def test_delta_dit_skips_rear_blocks_early_and_front_blocks_late():
    schedule = C.DeltaDiT(interval=2, boundary=0.5, blocks=2).schedule(8, 6)
    assert schedule.block_reuse == "delta"
    assert schedule.compute[0].all() and schedule.compute[2].all()
    assert not schedule.compute[1, 4:].any() and schedule.compute[1, :4].all()  # early: rear skipped
    assert not schedule.compute[5, :2].any() and schedule.compute[5, 2:].all()  # late: front skipped


def test_toca_recomputes_the_published_fractions_of_tokens(model):
    _, run = denoise(model, "toca:interval=3,ratio=0.3")
    # 7 steps: refresh at 0, 3, 6; 4 partial steps with 16 tokens (8x8 latents, patch 2) x batch 2.
    policy = C.ToCa(interval=3, ratio=0.3)
    frac = policy.fractions()
    assert frac == {"attn1": 0.0, "attn2": pytest.approx(0.18), "ff": pytest.approx(0.48)}
    full = run.macs_full / STEPS  # per step
    blocks = list(model.transformer_blocks)
    per_attn2 = sum(C.component_macs(b, "attn2", 2, 16, 16, (4, 4), 5) for b in blocks)
    partial_attn2 = sum(C.component_macs(b, "attn2", 2, int(np.ceil(0.18 * 16)), 16, (4, 4), 5) for b in blocks)
    assert run.macs["attn2"] == 3 * per_attn2 + 4 * partial_attn2
    assert run.macs_spent < 0.6 * run.macs_full and full > 0


def test_toca_spreads_recomputed_tokens_over_the_image():
    policy = C.ToCa(ratio=0.25, cross_factor=1.0, window=2)
    run = C.CacheRun(policy, 3, 1)
    run._stale[0, "attn2"] = torch.zeros(1, 16)
    run._scores[0] = torch.zeros(1, 16)
    run._scores[0][0, :4] = torch.tensor([0.9, 0.8, 0.7, 0.6])  # all high scores in one corner
    rows = run._select(0, "attn2", 0.25, (4, 4), policy)[0].tolist()
    cells = {(r // 4 // 2, r % 4 // 2) for r in rows}
    assert len(cells) == 4  # one token from each 2x2 cell, not four from the top row
    assert run._stale[0, "attn2"][0, rows].eq(0).all() and run._stale[0, "attn2"].sum() == 12


def test_teacache_with_a_high_threshold_computes_only_the_first_and_last_steps(model):
    _, run = denoise(model, "teacache:1000")
    assert run.decisions == [True] + [False] * (STEPS - 2) + [True]
    assert run.macs_spent == 2 * run.macs_full // STEPS


def test_first_block_cache_always_runs_block_0(model):
    _, run = denoise(model, "first-block:1000")
    assert run.decisions == [True] + [False] * (STEPS - 2) + [True]
    per_block = run.macs_full // STEPS // 4
    assert run.macs_spent == 2 * run.macs_full // STEPS + (STEPS - 2) * per_block


# --------------------------------------------------------------------------- exact MACs
@pytest.mark.parametrize("variant", ["alpha", "sigma-kv"])
def test_schedule_macs_match_the_flop_counter(variant):
    if variant == "alpha":
        model = random_transformer("tiny", num_layers=4, use_additional_conditions=True, num_attention_heads=3,
                                   attention_head_dim=16, cross_attention_dim=48)
    else:
        model = random_transformer("tiny", num_layers=4, kv_compress_layers=(1, 3), kv_compress_scale=2)
    # torch's FLOP counter has no formula for the CPU flash-attention kernel: count the plain
    # (matmul + softmax) attention path, the same arithmetic.
    model.set_exact_speedups(False)
    rng = np.random.default_rng(0)
    compute = rng.random((STEPS, 4, 3)) < 0.5
    compute[0] = True
    schedule = C.CacheSchedule(compute)
    with FlopCounterMode(display=False) as counter:
        denoise(model, schedule)
    counted = counter.get_total_flops() / 2
    expected = C.schedule_macs(model, schedule, 64, 64, text_len=5, batch=2)
    assert expected["total"] == pytest.approx(counted, rel=0.01)
    assert expected["ratio"] > 1.3


def test_runtime_macs_equal_the_analytic_count(model):
    schedule = C.DeltaDiT(interval=2, blocks=2).schedule(STEPS, 4)
    _, run = denoise(model, schedule)
    analytic = C.schedule_macs(model, schedule, 64, 64, text_len=5, batch=2)
    fixed = analytic["no_cache"] - run.macs_full
    assert run.macs_spent + fixed == analytic["total"]


# --------------------------------------------------------------------------- files and specs
def test_schedule_json_round_trip(tmp_path):
    schedule = C.DeltaDiT(interval=2, blocks=3).schedule(10, 6)
    path = schedule.save(tmp_path / "s.json")
    loaded = C.parse_cache_spec(str(path))
    assert loaded == schedule and loaded.block_reuse == "delta" and loaded.name == schedule.name
    assert loaded.searched_on is None and "searched_on" not in schedule.to_dict()
    from dataclasses import replace

    tagged = replace(schedule, searched_on="555cd74014")
    assert C.CacheSchedule.load(tagged.save(tmp_path / "t.json")).searched_on == "555cd74014"
    with pytest.raises(PixforgeError, match="searched_on must be a model hash"):
        C.CacheSchedule.from_dict({**tagged.to_dict(), "searched_on": 5})
    assert loaded.guidance_scale is None and "guidance_scale" not in schedule.to_dict()
    scaled = C.CacheSchedule.load(replace(schedule, guidance_scale=2.25).save(tmp_path / "g.json"))
    assert scaled.guidance_scale == 2.25 and scaled == schedule  # metadata, not what it computes
    assert C.schedule_guidance_scale(C.WithCfgCache(scaled, C.CfgCache(2))) == 2.25 == C.schedule_guidance_scale(C.Icc(scaled, 2))
    assert C.schedule_guidance_scale(C.Fora(2)) is None and C.schedule_guidance_scale(None) is None
    for bad in ("2.5", True, -1.0, float("nan")):
        with pytest.raises(PixforgeError, match="guidance_scale"):
            C.CacheSchedule.from_dict({**schedule.to_dict(), "guidance_scale": bad})


def test_ecad_published_format_reads_and_writes(tmp_path):
    # Built like AniAggarwal/ecad schedules/schedules_in_paper/pixart_alpha_256/ours_fast.json.
    rng = np.random.default_rng(1)
    table = {}
    for s in range(20):
        table[f"{s:03d}"] = {str(b): {c: bool(s == 0 or rng.random() < 0.6) for c in ("attn1", "attn2", "ff")}
                             for b in range(28)}
    data = {"cache_schedule": {"num_blocks": 28, "num_inference_steps": 20, "name": "ours_fast", "schedule": table}}
    path = tmp_path / "ours_fast.json"
    path.write_text(json.dumps(data))
    schedule = C.CacheSchedule.load(path)
    assert schedule.steps == 20 and schedule.blocks == 28 and schedule.name == "ours_fast"
    assert schedule.compute[5, 7, 1] == table["005"]["7"]["attn2"]
    assert schedule.to_ecad() == data
    assert C.CacheSchedule.from_dict(schedule.to_dict()) == schedule


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"format": C.SCHEDULE_FORMAT, "steps": 2, "blocks": 2, "compute": ["111 111"]}, "header says 2 steps"),
        ({"format": C.SCHEDULE_FORMAT, "steps": 1, "blocks": 2, "compute": ["111 11"]}, "shape"),
        ({"format": C.SCHEDULE_FORMAT, "steps": 2, "blocks": 1, "compute": ["101", "111"]}, "step 0"),
        ({"format": C.SCHEDULE_FORMAT, "steps": 1, "blocks": 1, "compute": ["1x1"]}, "only 0, 1"),
        ({"steps": 1}, "not a cache schedule"),
        ({"cache_schedule": {"num_blocks": 2, "num_inference_steps": 1, "schedule": {"000": {"0": {"attn1": True}}}}}, "attn2"),
        ({"cache_schedule": {"num_blocks": 2, "num_inference_steps": 1,
                             "schedule": {"000": {"0": {"attn1": True, "attn2": True, "ff": True}}}}}, "1 of 2"),
    ],
)
def test_bad_schedule_files_are_refused_clearly(tmp_path, payload, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(PixforgeError, match=message):
        C.CacheSchedule.load(path)


@pytest.mark.parametrize(
    "spec, message",
    [("lru:3", "unknown cache policy 'lru'"), ("fora:x", "not a number"), ("fora:0", ">= 1"),
     ("toca:speed=2", "no parameter 'speed'"), ("teacache:nan", "finite"), ("missing/s.json", "not found"),
     ("late-dense:0", "share of steps computed"), ("late-dense:0.4,gamma=2", "gamma"),
     (42, "not a policy spec")],
)
def test_bad_specs_name_the_problem(spec, message):
    with pytest.raises(PixforgeError, match=message):
        C.parse_cache_spec(spec)


def test_schedule_for_another_step_count_is_refused(model):
    with pytest.raises(PixforgeError, match="is for 7 steps x 4 blocks"):
        C.Fora(2).schedule(STEPS, 4).start(10, 4)


def test_specs_parse_to_policies():
    assert C.parse_cache_spec("none") is None and C.parse_cache_spec(None) is None
    assert C.parse_cache_spec("fora:3") == C.Fora(3)
    assert C.parse_cache_spec("toca:interval=4,ratio=0.2") == C.ToCa(interval=4, ratio=0.2)
    assert C.parse_cache_spec("teacache:0.2", (2.0, 0.0)).coefficients == (2.0, 0.0)
    assert C.parse_cache_spec("delta-dit:2,boundary=10,blocks=3") == C.DeltaDiT(2, 10.0, 3)
    assert C.parse_cache_spec("late-dense:0.4,gamma=0.7") == C.LateDense(0.4, 0.7)


def test_late_dense_computes_whole_steps_sparse_early_dense_late():
    assert C.late_dense_steps(20, 8, 0.5) == [0, 7, 10, 12, 14, 16, 18, 19]
    for steps in (5, 20, 50):
        for count in range(2, steps + 1):
            chosen = C.late_dense_steps(steps, count, 0.5)
            assert len(chosen) == count and chosen[0] == 0 and chosen[-1] == steps - 1
            assert all(b > a for a, b in zip(chosen, chosen[1:]))
    gaps = np.diff(C.late_dense_steps(20, 8, 0.5))
    assert (np.diff(gaps) <= 0).all() and gaps[0] > gaps[-1]  # gaps shrink toward the end
    schedule = C.LateDense(0.4).schedule(20, 3)
    per_step = schedule.compute.all(axis=(1, 2))
    assert per_step.sum() == 8 and (schedule.compute.any(axis=(1, 2)) == per_step).all()  # whole steps
    assert schedule.compute[10:].mean() > schedule.compute[:10].mean()


def test_schedule_edits_switch_whole_components_at_the_given_steps():
    base = C.Fora(3).schedule(8, 4).with_guidance([1, 0, 1, 0, 1, 0, 1, 0])
    edited = base.edited("+attn1:1-2/5&-attn2:3&+guidance:1")
    attn1, attn2, ff = (edited.compute[:, :, i] for i in range(3))
    assert attn1[[0, 1, 2, 3, 5, 6]].all() and not attn1[[4, 7]].any()  # fora:3 computes 0, 3, 6; +1, 2, 5
    assert attn2[[0, 6]].all() and not attn2[[1, 2, 3, 4, 5, 7]].any()  # step 3's cross-attention now reused
    assert np.array_equal(ff, base.compute[:, :, 2])  # untouched component
    assert edited.guidance.tolist() == [1, 1, 1, 0, 1, 0, 1, 0]
    assert edited.name == "fora:3+attn1:1-2/5&-attn2:3&+guidance:1" and base.edited("-ff:1", name="x").name == "x"
    assert base.edited("+attn1:0-7&+attn2:0-7&+ff:0-7&+guidance:0-7") == C.CacheSchedule.all_compute(8, 4)
    for bad, message in [("attn1:1", "expected"), ("+mlp:1", "expected"), ("+ff:", "expected"), ("+ff:1-x", "steps are"),
                         ("+ff:8", "0..7"), ("-ff:0", "reuses something at step 0"), ("-guidance:0", "step 0")]:
        with pytest.raises(PixforgeError, match=message):
            base.edited(bad)


# --------------------------------------------------------------------------- CFG-cache
def test_cfg_cache_specs_and_schedules(tmp_path):
    assert C.parse_cache_spec("cfg-cache:3") == C.CfgCache(3)
    combined = C.parse_cache_spec("fora:2+cfg-cache:3")
    assert combined == C.WithCfgCache(C.Fora(2), C.CfgCache(3)) and combined.name == "fora:2+cfg-cache:3"
    schedule = combined.schedule(7, 4)
    assert schedule.guidance.tolist() == [True, False, False, True, False, False, True]
    assert np.array_equal(schedule.compute, C.Fora(2).schedule(7, 4).compute)
    loaded = C.parse_cache_spec(str(schedule.save(tmp_path / "s.json")) + "+cfg-cache:2")  # file + cfg-cache
    assert loaded.schedule(7, 4).guidance.tolist() == [True, False, False, False, False, False, True]
    assert C.CacheSchedule.load(tmp_path / "s.json") == schedule
    assert "guidance" not in C.Fora(2).schedule(7, 4).to_dict()  # files without CFG-cache are unchanged
    assert C.CfgCache(1).schedule(7, 4).guidance is None  # every step runs both branches: the canonical form
    assert C.parse_cache_spec("teacache:0.1+cfg-cache:2").start(7, 4).guidance.tolist() == [1, 0, 1, 0, 1, 0, 1]
    with pytest.raises(PixforgeError, match="no unconditional-branch reuse"):
        schedule.to_ecad()


@pytest.mark.parametrize(
    "spec, message",
    [("toca:3+cfg-cache:2", "does not combine with toca"), ("cfg-cache:2+cfg-cache:3", "given twice"),
     ("fora:2+foo:1", "only cfg-cache:N and icc:R combine"), ("cfg-cache:0", ">= 1")],
)
def test_bad_cfg_cache_specs_name_the_problem(spec, message):
    with pytest.raises(PixforgeError, match=message):
        C.parse_cache_spec(spec)


@pytest.mark.parametrize("guidance, message", [("0111", "step 0"), ("101", "4 0/1 digits"), ("1x11", "0/1 digits")])
def test_bad_guidance_in_schedule_files_is_refused(tmp_path, guidance, message):
    data = C.Fora(2).schedule(4, 2).to_dict()
    data["guidance"] = guidance
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PixforgeError, match=message):
        C.CacheSchedule.load(path)


def test_schedule_macs_of_cfg_cache_count_half_batch_steps(model):
    schedule = C.CfgCache(2).schedule(STEPS, 4)  # steps 0, 2, 4, 6 run both branches: 4 of 7
    macs = C.schedule_macs(model, schedule, 64, 64, text_len=5, batch=2)
    assert macs["blocks"] == pytest.approx(macs["blocks_no_cache"] * (4 + 3 * 0.5) / 7)
    with pytest.raises(PixforgeError, match="CFG batch"):
        C.schedule_macs(model, schedule, 64, 64, text_len=5, batch=1)


# --------------------------------------------------------------------------- icc (increment calibration)
def max_error(outputs, reference):
    return max(float((a - b).abs().max()) for a, b in zip(outputs, reference))


def test_icc_at_full_rank_recomputes_exactly(model):
    """At rank >= every layer's width the SVD factors are exact, and a linear layer moved by its
    input change is the layer applied to the new input: reuse becomes recomputation."""
    reference, _ = denoise(model)
    cached, run = denoise(model, "fora:3+icc:100000")
    assert max_error(cached, reference) < 1e-4
    plain, _ = denoise(model, "fora:3")
    assert max_error(plain, reference) > 1e-2


def test_icc_error_falls_with_the_rank(model):
    reference, _ = denoise(model)
    errors = [max_error(denoise(model, spec)[0], reference) for spec in ("fora:3", "fora:3+icc:4", "fora:3+icc:16")]
    assert errors[0] > errors[1] > errors[2]


def test_icc_changes_only_the_reused_steps(model):
    reference, _ = denoise(model)
    cached, _ = denoise(model, "fora:3+icc:4")
    plain, _ = denoise(model, "fora:3")
    assert torch.equal(cached[0], reference[0]) and torch.equal(plain[0], reference[0])
    assert not torch.equal(cached[1], plain[1])  # step 1 reuses: calibrated vs plain


@pytest.mark.parametrize("kv", [False, True])
def test_icc_macs_match_the_flop_counter_and_the_runtime(kv):
    extra = {"kv_compress_layers": (1, 3), "kv_compress_scale": 2} if kv else {}
    model = random_transformer("tiny", num_layers=4, **extra)
    model.set_exact_speedups(False)
    rng = np.random.default_rng(0)
    compute = rng.random((STEPS, 4, 3)) < 0.5
    compute[0] = True
    schedule = C.CacheSchedule(compute).with_calibration(3)
    with FlopCounterMode(display=False) as counter:
        _, run = denoise(model, schedule)
    counted = counter.get_total_flops() / 2
    expected = C.schedule_macs(model, schedule, 64, 64, text_len=5, batch=2)
    plain = C.schedule_macs(model, schedule.with_calibration(0), 64, 64, text_len=5, batch=2)
    assert expected["total"] == pytest.approx(counted, rel=0.01)
    assert run.macs_spent + expected["no_cache"] - run.macs_full == pytest.approx(expected["total"])
    assert 1.0 < expected["ratio"] < plain["ratio"]  # calibration costs MACs, less than recomputing


def test_icc_specs_files_and_errors(tmp_path):
    policy = C.parse_cache_spec("fora:3+icc:16")
    assert policy == C.Icc(C.Fora(3), 16) and policy.name == "fora:3+icc:16"
    schedule = policy.schedule(7, 4)
    assert schedule.calibration_rank == 16 and np.array_equal(schedule.compute, C.Fora(3).schedule(7, 4).compute)
    both = C.parse_cache_spec("fora:3+cfg-cache:2+icc:8").schedule(7, 4)
    assert both == C.parse_cache_spec("fora:3+icc:8+cfg-cache:2").schedule(7, 4)
    assert both.calibration_rank == 8 and both.guidance is not None
    loaded = C.CacheSchedule.load(both.save(tmp_path / "s.json"))
    assert loaded == both and loaded != both.with_calibration(0)
    assert "calibration_rank" not in C.Fora(3).schedule(7, 4).to_dict()  # files without icc are unchanged
    assert C.parse_cache_spec(str(C.Fora(3).schedule(7, 4).save(tmp_path / "f.json")) + "+icc:4").schedule(
        7, 4).calibration_rank == 4
    with pytest.raises(PixforgeError, match="no increment calibration"):
        schedule.to_ecad()
    data = schedule.to_dict()
    data["calibration_rank"] = -1
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(PixforgeError, match="calibration_rank must be an integer >= 0"):
        C.CacheSchedule.load(tmp_path / "bad.json")


@pytest.mark.parametrize(
    "spec, message",
    [("toca:3+icc:4", "does not combine with toca"), ("teacache:0.1+icc:4", "does not combine"),
     ("delta-dit:2+icc:4", "does not combine"), ("fora:3+icc:0", ">= 1"), ("fora:3+icc:x", "not an integer"),
     ("fora:3+icc:rank=4+icc:2", "given twice"), ("none+icc:4", "give one"), ("fora:3+icc:size=2", "takes rank")],
)
def test_bad_icc_specs_name_the_problem(spec, message):
    with pytest.raises(PixforgeError, match=message):
        C.parse_cache_spec(spec)


def test_lowrank_factors_are_computed_once_per_weight_and_follow_weight_changes():
    layer = torch.nn.Linear(8, 12)
    first = C.lowrank_factors(layer, 3)
    assert C.lowrank_factors(layer, 5)[0].shape == (8, 5)  # another rank, sliced from the same SVD
    assert C.lowrank_factors(layer, 3) is first
    with torch.no_grad():
        layer.weight.mul_(2.0)  # new weights (a load, a training step): a new SVD
    again = C.lowrank_factors(layer, 3)
    assert again is not first and torch.allclose(again[1], 2 * first[1], atol=1e-5)
    b_t, a_t = C.lowrank_factors(layer, 100)  # rank >= width: exact
    torch.testing.assert_close(b_t @ a_t, layer.weight.detach().T, atol=1e-5, rtol=1e-5)
