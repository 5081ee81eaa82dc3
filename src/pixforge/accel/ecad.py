"""ECAD: search per-step x per-block x per-component cache schedules with NSGA-II (pymoo).

Genome: steps x blocks x 3 bits, 1 = compute (ECAD's convention). Objectives, both
minimised: 1 - quality (compositional accuracy from the shapes checker on a calibration
prompt set, or any callable) and the schedule's MACs relative to no cache. Paper settings
by default: population 72, 4-point crossover p=0.9, bit-flip mutation 0.05 per bit, the
first population seeded with FORA / Δ-DiT-style schedules plus random ones, and a
constraint that a candidate reuses something (differs from the all-compute schedule).

Every generation is checkpointed (population, objectives, ranks, RNG state, every
evaluation so far) as JSON, so re-running the same command continues from the last
generation and never evaluates a genome twice.

    search = ScheduleSearch(evaluate, macs_ratio, steps=20, blocks=28, out_dir="runs/ecad")
    front = search.run(generations=30)        # [(quality, macs_ratio, CacheSchedule), ...]
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pixforge.accel.cache import CacheSchedule, CfgCache, DeltaDiT, Fora, LateDense
from pixforge.errors import PixforgeError

log = logging.getLogger(__name__)

STATE_FILE = "search_state.json"
# What one genome bit decides: "component" one component of one block at one step (ECAD's
# genome, steps x blocks x 3); "step-component" one component type in every block at one step
# (steps x 3); "step" a whole step (steps). The coarser genomes are for small evaluation
# budgets, where single-bit changes of the full genome are too small to rank against the
# quality signal's noise.
GRANULARITIES = ("component", "step-component", "step")


@dataclass(frozen=True)
class SearchConfig:
    population: int = 72
    crossover_points: int = 4
    crossover_prob: float = 0.9
    mutation_rate: float = 0.05  # per bit
    random_fraction: float = 0.5  # of the first population; the rest are heuristic schedules
    seed: int = 0
    granularity: str = "component"  # genome: one bit per step x block x component (ECAD), ...
    guidance: bool = False  # + one bit per step: run the unconditional CFG branch (else reuse its delta)
    # Keep the search inside this MACs speed-up window (lo, hi; hi may be inf): two more
    # constraints, and a candidate outside it is never run through the model.
    speedup: tuple[float, float] | None = None
    # icc: every candidate calibrates its reused components at this rank (0: plain reuse)
    calibration_rank: int = 0

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise PixforgeError(f"granularity={self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        if self.population < 4:
            raise PixforgeError(f"population={self.population} must be >= 4")
        if not all(0 <= v <= 1 for v in (self.mutation_rate, self.crossover_prob, self.random_fraction)):
            raise PixforgeError("mutation_rate, crossover_prob and random_fraction must be in [0, 1]")
        if not isinstance(self.calibration_rank, int) or self.calibration_rank < 0:
            raise PixforgeError(f"calibration_rank={self.calibration_rank!r} must be an int >= 0")
        if self.speedup is not None:
            lo, hi = self.speedup
            if not 1.0 <= lo < hi:
                raise PixforgeError(f"speed-up window {lo}..{hi}: need 1 <= min < max")

    @property
    def macs_window(self) -> tuple[float, float] | None:
        """The speed-up window as MACs ratios (low, high), or None."""
        if self.speedup is None:
            return None
        lo, hi = self.speedup
        return 1.0 / hi, 1.0 / lo


def genome_key(bits: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(bits.astype(bool)).tobytes()).hexdigest()[:16]


def pack_genome(bits: np.ndarray) -> str:
    return np.packbits(np.asarray(bits, bool)).tobytes().hex()


def unpack_genome(text: str, n_var: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), np.uint8))[:n_var].astype(bool)


def heuristic_schedules(steps: int, blocks: int, guidance: bool = False) -> list[CacheSchedule]:
    """Hand-made schedules for the first population: late-dense step sets (the best trade of
    whole-step reuse measured here), FORA 2..5 and gated Δ-DiT variants; with `guidance`,
    CFG-cache every 2nd/3rd/4th step alone and on each of those too."""
    out = []
    for fraction in (0.3, 0.4, 0.5, 0.6):  # of the steps computed, cheapest first
        for gamma in (0.5, 0.7):
            schedule = LateDense(fraction, gamma).schedule(steps, blocks)
            if not schedule.compute.all():
                out.append(schedule)
    out += [Fora(n).schedule(steps, blocks) for n in (2, 3, 4, 5) if n < steps]
    for boundary in (0.3, 0.5, 0.7):
        for skip in (blocks // 4, blocks // 2):
            if skip:
                s = DeltaDiT(2, boundary, skip).schedule(steps, blocks)
                out.append(CacheSchedule(s.compute, name=s.name + ",gated"))
    return with_cfg_variants(out, steps, blocks) if guidance else out


def with_cfg_variants(schedules: list[CacheSchedule], steps: int, blocks: int) -> list[CacheSchedule]:
    """CFG-cache every 2nd / 3rd / 4th step alone, then each schedule as given and with every
    2nd and every 3rd step's unconditional branch reused."""
    out = [CfgCache(n).schedule(steps, blocks) for n in (2, 3, 4)]
    for schedule in schedules:
        out.append(schedule)
        out += [schedule.with_guidance(schedule.guidance_mask & CfgCache(n).mask(steps), f"{schedule.name}+cfg-cache:{n}")
                for n in (2, 3)]
    return out


def front_schedules(path: str | Path) -> list[CacheSchedule]:
    """Seeds for another search: the schedules of a search's pareto.json, best quality first,
    or the one schedule of a schedule file (ours or ECAD's)."""
    return [schedule for schedule, _ in front_points(path)]


def _front_file(path: str | Path) -> tuple[Path, dict]:
    """A search folder's pareto.json, a pareto.json or a schedule file, and its JSON object."""
    path = Path(path)
    if path.is_dir():
        path = path / "pareto.json"
    if not path.is_file():
        raise PixforgeError(f"ECAD front not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PixforgeError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise PixforgeError(f"{path}: not an ECAD pareto.json or a cache schedule")
    return path, data


def search_identity(path: str | Path) -> dict | None:
    """The settings of the search that wrote a pareto.json (prompts, cfg, quality kind...);
    None for a schedule file."""
    return _front_file(path)[1].get("identity")


def front_points(path: str | Path) -> list[tuple[CacheSchedule, float | None]]:
    """(schedule, the quality its search measured) for each point of a pareto.json, best quality
    first; a schedule file (ours or ECAD's) gives its one schedule, quality None."""
    path, data = _front_file(path)
    try:
        if "front" not in data:
            return [(CacheSchedule.load(path), None)]
        return _ranked_points(data["front"], path)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise PixforgeError(f"{path}: not an ECAD pareto.json ({error!r})") from error


def _ranked_points(entries: list[dict], path: Path, label: str = "point") -> list[tuple[CacheSchedule, float]]:
    """(schedule, quality) of pareto.json entries, best quality first (errors name the entry's file,
    else `label`)."""
    ranked = sorted(entries, key=lambda e: -float(e["quality"]))
    return [(CacheSchedule.from_dict(e["schedule"], source=f"{path}: {e.get('file', label)}"), float(e["quality"]))
            for e in ranked]


class ScheduleSearch:
    """NSGA-II over cache schedules.

    evaluate(schedules) -> qualities in [0, 1] (higher is better), batched over a list.
    macs_ratio(schedule) -> MACs of the schedule / MACs without cache.
    """

    def __init__(
        self,
        evaluate: Callable[[Sequence[CacheSchedule]], Sequence[float]],
        macs_ratio: Callable[[CacheSchedule], float],
        steps: int,
        blocks: int,
        out_dir: str | Path,
        config: SearchConfig = SearchConfig(),
        identity: dict | None = None,
        seeds: Sequence[CacheSchedule] = (),
    ):
        """`seeds`: schedules that lead the first population (e.g. an earlier search's front),
        ahead of the hand-made ones; those this genome cannot express are skipped."""
        self.evaluate, self.macs_ratio = evaluate, macs_ratio
        self.steps, self.blocks, self.config = steps, blocks, config
        self.out_dir = Path(out_dir)
        self.seeds = list(seeds)
        self.identity = {"steps": steps, "blocks": blocks, **asdict(config), **(identity or {})}
        if config.granularity == "component":  # (searches from before the options keep their identity)
            del self.identity["granularity"]
        if not config.guidance:
            del self.identity["guidance"]
        if not config.calibration_rank:
            del self.identity["calibration_rank"]
        if config.speedup is None:
            del self.identity["speedup"]
        else:  # as JSON reads it back (a list; an unbounded top as null)
            lo, hi = config.speedup
            self.identity["speedup"] = [lo, hi if np.isfinite(hi) else None]
        free_bits = self.n_var - self.step_width - config.guidance  # step 0 always computes
        if free_bits < 60 and config.population > 2 ** free_bits - 1:
            raise PixforgeError(
                f"population {config.population} is larger than the {2 ** free_bits - 1} distinct schedules a "
                f"{config.granularity}-granularity genome of {steps} steps can express; use a smaller population"
            )
        # genome key -> (quality, macs ratio); quality None: outside the speed-up window, not run
        self.cache: dict[str, tuple[float | None, float]] = {}
        self.genomes: dict[str, str] = {}  # genome key -> its bits (pack_genome), for re-scoring any of them
        self.history: list[dict] = []

    # --- genome <-> schedule ---------------------------------------------------------------
    @property
    def step_width(self) -> int:
        """Genome bits per step."""
        return {"component": self.blocks * 3, "step-component": 3, "step": 1}[self.config.granularity]

    @property
    def n_block_bits(self) -> int:
        return self.steps * self.step_width

    @property
    def n_var(self) -> int:
        """Block bits (steps x step_width), then with `guidance` one bit per step."""
        return self.n_block_bits + (self.steps if self.config.guidance else 0)

    def schedule(self, bits: np.ndarray, name: str = "ecad") -> CacheSchedule:
        bits = np.asarray(bits, bool)
        guidance = None
        if self.config.guidance:
            guidance = bits[self.n_block_bits:].copy()
            guidance[0] = True
        bits = bits[:self.n_block_bits].reshape(self.steps, -1)
        if self.config.granularity == "component":
            compute = bits.reshape(self.steps, self.blocks, 3).copy()
        else:  # one decision per step (x component) for every block
            per_step = bits if bits.shape[1] == 3 else np.repeat(bits, 3, axis=1)
            compute = np.repeat(per_step[:, None, :], self.blocks, axis=1)
        compute[0] = True
        return CacheSchedule(compute, name=name, guidance=guidance, calibration_rank=self.config.calibration_rank)

    def genome(self, schedule: CacheSchedule) -> np.ndarray | None:
        """The genome of a schedule, or None if this genome cannot express it. A schedule's
        calibration rank is not part of the genome: the search's own rank applies to it."""
        if (schedule.steps, schedule.blocks) != (self.steps, self.blocks) or schedule.block_reuse != "gated":
            return None
        if schedule.guidance is not None and not self.config.guidance:
            return None
        compute = schedule.compute
        granularity = self.config.granularity
        block_bits = compute if granularity == "component" else compute[:, 0, :3 if granularity == "step-component" else 1]
        bits = block_bits.reshape(-1).copy()
        if self.config.guidance:
            bits = np.concatenate([bits, schedule.guidance_mask])
        if granularity != "component" and not np.array_equal(self.schedule(bits).compute, compute):
            return None  # blocks (or components) differ within a step: a coarse genome cannot hold it
        return bits

    def _in_window(self, macs: float) -> bool:
        window = self.config.macs_window
        return window is None or window[0] <= macs <= window[1]

    def _objectives(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """F = (1 - quality, MACs ratio); G <= 0 when feasible: something is reused and, with a
        speed-up window, MACs inside it. A candidate outside the window is not run (quality
        None in the cache, F = 2): constraint violation alone ranks it."""
        X = X.astype(bool)
        keys = [genome_key(x) for x in X]
        for key, x in zip(keys, X):
            self.genomes.setdefault(key, pack_genome(x))
        todo = [(k, self.schedule(x)) for k, x in dict(zip(keys, X)).items() if k not in self.cache]
        costs = {key: float(self.macs_ratio(schedule)) for key, schedule in todo}
        run = [(key, schedule) for key, schedule in todo if self._in_window(costs[key])]
        if run:
            qualities = list(self.evaluate([schedule for _, schedule in run]))
            if len(qualities) != len(run):
                raise PixforgeError(f"quality function returned {len(qualities)} values for {len(run)} schedules")
            for (key, _), quality in zip(run, qualities):
                self.cache[key] = (float(quality), costs[key])
        for key, _ in todo:
            self.cache.setdefault(key, (None, costs[key]))
        F = np.array([[2.0 if self.cache[k][0] is None else 1.0 - self.cache[k][0], self.cache[k][1]] for k in keys])
        reused = (~X[:, self.step_width:]).sum(axis=1)
        G = (1.0 - reused)[:, None].astype(float)  # feasible (<= 0) when something is reused
        window = self.config.macs_window
        if window is not None:
            G = np.hstack([G, window[0] - F[:, 1:], F[:, 1:] - window[1]])
        return F, G

    # --- pymoo ------------------------------------------------------------------------------
    def _algorithm(self, initial: np.ndarray):
        from pymoo.algorithms.moo.nsga2 import NSGA2
        from pymoo.core.problem import Problem
        from pymoo.core.repair import Repair
        from pymoo.operators.crossover.pntx import PointCrossover
        from pymoo.core.termination import NoTermination
        from pymoo.operators.mutation.bitflip import BitflipMutation

        first, guidance_first = self.step_width, (self.n_block_bits if self.config.guidance else None)

        class FirstStepComputes(Repair):
            def _do(self, problem, X, **kwargs):
                X = X.copy()
                X[:, :first] = True
                if guidance_first is not None:
                    X[:, guidance_first] = True
                return X

        c = self.config
        n_constraints = 1 if c.speedup is None else 3
        problem = Problem(n_var=self.n_var, n_obj=2, n_ieq_constr=n_constraints, xl=0, xu=1, vtype=bool)
        algorithm = NSGA2(
            pop_size=c.population, sampling=initial,
            crossover=PointCrossover(n_points=c.crossover_points, prob=c.crossover_prob),
            mutation=BitflipMutation(prob=1.0, prob_var=c.mutation_rate),
            repair=FirstStepComputes(), eliminate_duplicates=True,
        )
        algorithm.setup(problem, termination=NoTermination(), seed=c.seed)
        return algorithm

    def initial_population(self) -> np.ndarray:
        c = self.config
        rng = np.random.default_rng(c.seed)
        first = self.step_width
        seeds = {}
        given = with_cfg_variants(self.seeds, self.steps, self.blocks)[3:] if self.config.guidance else self.seeds
        for schedule in given + heuristic_schedules(self.steps, self.blocks, self.config.guidance):
            bits = self.genome(schedule)
            if bits is not None and not bits[first:].all():
                seeds.setdefault(genome_key(bits), bits)
        n_heuristic = min(len(seeds), c.population - int(round(c.random_fraction * c.population)))
        rows = dict(list(seeds.items())[:n_heuristic])
        low, high = c.macs_window or (0.3, 0.9)  # a window: compute about the share it allows
        while len(rows) < c.population:
            density = rng.uniform(low, high)  # random schedules from sparse to dense
            bits = rng.random(self.n_var) < density
            bits[:first] = True
            if self.config.guidance:
                bits[self.n_block_bits] = True
            if bits[first:].all():
                continue
            rows.setdefault(genome_key(bits), bits)
        return np.array(list(rows.values()), dtype=bool)

    # --- checkpointing ----------------------------------------------------------------------------
    def _save(self, algorithm, generation: int) -> None:
        from pixforge.models.convert import atomic_write_bytes

        pop = algorithm.pop
        state = {
            "identity": self.identity, "generation": generation,
            "X": [genome.astype(int).tolist() for genome in pop.get("X").astype(bool)],
            "rank": pop.get("rank").tolist(),
            # an infeasible member (outside a speed-up window) has no crowding distance: null
            "crowding": [None if v is None else float(v) for v in pop.get("crowding")],
            "rng": algorithm.random_state.bit_generator.state,
            "cache": self.cache, "history": self.history, "genomes": self.genomes,
        }
        atomic_write_bytes(self.out_dir / STATE_FILE, json.dumps(state).encode())

    def _resume(self, algorithm_factory):
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            return None, 0
        state = json.loads(path.read_text())
        if state["identity"] != self.identity:
            differing = sorted(k for k in set(state["identity"]) | set(self.identity)
                               if state["identity"].get(k) != self.identity.get(k))
            raise PixforgeError(
                f"{path} belongs to a different search (fields {', '.join(differing)} differ); "
                f"use another --out folder or the same settings"
            )
        self.cache = {k: tuple(v) for k, v in state["cache"].items()}
        self.genomes = dict(state.get("genomes", {}))  # (searches saved before it: the population's, below)
        self.history = state["history"]
        X = np.array(state["X"], dtype=bool)
        algorithm = algorithm_factory(X)
        pop = algorithm.ask()  # the saved population, evaluated from the cache (no model runs)
        F, G = self._objectives(pop.get("X"))
        pop.set("F", F, "G", G)
        algorithm.tell(infills=pop)
        # Restore the exact survivors' order, ranks and crowding and the RNG: the next
        # generation is the one the interrupted run would have made.
        from pymoo.core.population import Population

        F, G = self._objectives(X)
        restored = Population.new(X=X, F=F, G=G)  # CV and feasibility follow from G
        restored.set("rank", np.array(state["rank"]), "crowding", np.array(state["crowding"]))
        algorithm.pop = restored
        algorithm.random_state.bit_generator.state = state["rng"]
        log.info("resumed search at generation %d (%d genomes evaluated)", state["generation"], len(self.cache))
        return algorithm, state["generation"]

    @property
    def evaluations(self) -> int:
        """Genomes run through the quality function so far (not those outside the window)."""
        return sum(quality is not None for quality, _ in self.cache.values())

    # --- the loop ------------------------------------------------------------------------------------
    def run(self, generations: int, progress: Callable[[dict], None] | None = None,
            deadline: float | None = None) -> list[dict]:
        """Run (or continue) until `generations` generations are done, or until the first
        generation that ends after `deadline` (a time.time() value); return the Pareto front.
        `progress` sees each generation's record once it is saved (self.front() is then its front)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        algorithm, done = self._resume(self._algorithm)
        if algorithm is None:
            algorithm = self._algorithm(self.initial_population())
        self.algorithm = algorithm
        while done < generations and (deadline is None or time.time() < deadline):
            start = time.time()
            pop = algorithm.ask()
            evaluated_before = self.evaluations
            F, G = self._objectives(pop.get("X"))
            pop.set("F", F, "G", G)
            algorithm.tell(infills=pop)
            done += 1
            front = self.front(algorithm)
            record = {"generation": done, "evaluations": self.evaluations, "new": self.evaluations - evaluated_before,
                      "seconds": round(time.time() - start, 2), "front": [(p["quality"], p["macs_ratio"]) for p in front]}
            self.history.append(record)
            self._save(algorithm, done)
            if progress is not None:
                progress(record)
        return self.front(algorithm)

    def front(self, algorithm=None) -> list[dict]:
        """Non-dominated feasible points of the current population, cheapest first."""
        algorithm = algorithm or self.algorithm
        pop = algorithm.pop
        if pop is None:  # no generation run yet (a deadline already past)
            return []
        points = {}  # genome key -> point; an infeasible point still dominates the points it beats
        for x, f, g in zip(pop.get("X").astype(bool), pop.get("F"), pop.get("G")):
            key = genome_key(x)
            points.setdefault(key, {"quality": 1.0 - float(f[0]), "macs_ratio": float(f[1]), "feasible": bool((g <= 0).all()),
                                    "x": x, "key": key})
        return [{"quality": p["quality"], "macs_ratio": p["macs_ratio"], "speedup_macs": 1.0 / p["macs_ratio"],
                 "schedule": self.schedule(p["x"], name=f"ecad-{p['key']}")}
                for p in non_dominated(list(points.values())) if p["feasible"]]

    def write_front(self, front: list[dict]) -> Path:
        """pareto.json (every point with its schedule) + one schedule file per point."""
        return write_front(self.out_dir, self.identity, front)


def scored_points(path: str | Path) -> list[tuple[CacheSchedule, float]]:
    """The points a pareto.json keeps beyond its front ("others": a re-scoring's dominated
    candidates), best quality first; none for a file without them."""
    path, data = _front_file(path)
    try:
        return _ranked_points(data.get("others", []), path, "others")
    except (KeyError, TypeError, ValueError) as error:
        raise PixforgeError(f"{path}: bad 'others' entry ({error!r})") from error


def evaluated_points(folder: str | Path) -> list[tuple[CacheSchedule, float]]:
    """Every schedule a search folder's state holds with the quality its search measured, best
    first: all evaluated genomes for searches saved with their bits (`genomes`), else those of
    the final population. Outside-the-window genomes (never run) are left out."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise PixforgeError(f"{path} not found: a search folder (pixforge search-cache --out) is needed")
    try:
        state = json.loads(path.read_text())
        identity = state["identity"]
        fields = {k: v for k, v in identity.items() if k in SearchConfig.__dataclass_fields__}
        if fields.get("speedup") is not None:
            lo, hi = fields["speedup"]
            fields["speedup"] = (lo, float("inf") if hi is None else hi)
        decoder = ScheduleSearch(lambda schedules: [], lambda schedule: 1.0, int(identity["steps"]),
                                 int(identity["blocks"]), folder, SearchConfig(**fields))
        genomes = dict(state.get("genomes", {}))
        for x in state["X"]:
            bits = np.asarray(x, bool)
            genomes.setdefault(genome_key(bits), pack_genome(bits))
        points = [(decoder.schedule(unpack_genome(bits, decoder.n_var), name=f"ecad-{key}"), float(state["cache"][key][0]))
                  for key, bits in genomes.items() if state["cache"].get(key, [None])[0] is not None]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise PixforgeError(f"{path}: not a search state ({error!r})") from error
    return sorted(points, key=lambda point: -point[1])


def write_front(out_dir: str | Path, identity: dict, front: list[dict], others: Sequence[dict] = ()) -> Path:
    """OUT/pareto.json (every point with its schedule and any extra fields) + OUT/front/*.json.
    `others`: more scored points (say, a re-scoring's dominated candidates), kept in pareto.json
    under "others" (no files) so a later `rescore-cache --top` can take them."""
    from pixforge.models.convert import atomic_write_bytes

    out_dir = Path(out_dir)
    folder = out_dir / "front"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, point in enumerate(front):
        if identity.get("model"):  # the weights its quality was measured on, and the guidance scale
            point = {**point, "schedule": replace(point["schedule"], searched_on=identity["model"],
                                                  guidance_scale=identity.get("cfg"))}
        path = point["schedule"].save(folder / f"{i:02d}-q{point['quality']:.3f}-x{point['speedup_macs']:.2f}.json")
        entry = {k: v for k, v in point.items() if k != "schedule"}
        entry.update(file=str(path.relative_to(out_dir)), schedule=point["schedule"].to_dict())
        entries.append(entry)
    data = {"identity": identity, "front": entries}
    if others:
        data["others"] = [{**{k: v for k, v in point.items() if k != "schedule"},
                           "schedule": point["schedule"].to_dict()} for point in others]
    out = out_dir / "pareto.json"
    atomic_write_bytes(out, json.dumps(data, indent=1).encode())
    return out


def schedule_key(schedule: CacheSchedule) -> str:
    """Identifies what a schedule computes (not its name)."""
    bits = np.concatenate([schedule.compute.reshape(-1), schedule.guidance_mask])
    return f"{schedule.block_reuse}-{genome_key(bits)}"


def non_dominated(points: list[dict]) -> list[dict]:
    """The points no other point beats on both quality (higher) and MACs ratio (lower), cheapest first."""
    def beaten(p):
        return any(o["quality"] >= p["quality"] and o["macs_ratio"] <= p["macs_ratio"]
                   and (o["quality"] > p["quality"] or o["macs_ratio"] < p["macs_ratio"]) for o in points)
    return sorted((p for p in points if not beaten(p)), key=lambda p: (p["macs_ratio"], -p["quality"]))


RESCORE_BATCH = 4  # schedules per quality call when re-scoring


def rescore(schedules: Sequence[CacheSchedule], evaluate: Callable[[Sequence[CacheSchedule]], Sequence[float]],
            macs_ratio: Callable[[CacheSchedule], float], progress: Callable[[int, int], None] | None = None,
            deadline: float | None = None) -> tuple[list[dict], list[dict]]:
    """Score candidate schedules (say, searches' fronts) again on prompts the search never saw.

    A front selected on one noisy accuracy estimate over-rates its points (the winner's curse:
    of two schedules equally good, the one whose calibration prompts happened to go well is
    kept); a fresh estimate on other prompts is unbiased for every candidate. The front
    re-selected on it is a selection again, so confirm its points on held-aside prompts
    (docs/acceleration.md: on 256 prompts the prompt sample moves a Δ by 2-3 points either
    way). Duplicates (same compute mask) are scored once.
    Returns (every candidate, the non-dominated ones), each {"quality", "macs_ratio",
    "speedup_macs", "schedule"}, cheapest first; with a `deadline` (a time.time() value) only
    those scored in the batches started before it.
    """
    first: dict[str, CacheSchedule] = {}
    for schedule in schedules:
        first.setdefault(schedule_key(schedule), schedule)
    unique = list(first.values())
    scored = []
    for start in range(0, len(unique), RESCORE_BATCH):  # a batch: checking one overlaps generating the next
        if deadline is not None and time.time() >= deadline:
            break
        batch = unique[start:start + RESCORE_BATCH]
        qualities = list(evaluate(batch))
        if len(qualities) != len(batch):
            raise PixforgeError(f"quality function returned {len(qualities)} values for {len(batch)} schedules")
        for schedule, quality in zip(batch, qualities):
            ratio = float(macs_ratio(schedule))
            scored.append({"quality": float(quality), "macs_ratio": ratio, "speedup_macs": 1.0 / ratio,
                           "schedule": schedule})
        if progress is not None:
            progress(len(scored), len(unique))
    scored.sort(key=lambda p: (p["macs_ratio"], -p["quality"]))
    return scored, non_dominated(scored)


def plot_front(front: list[dict], baselines: dict[str, tuple[float, float]], path: str | Path) -> Path:
    """Quality vs MACs (relative to no cache) of the front, with hand-made policies overlaid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["macs_ratio"] for p in front], [p["quality"] for p in front], "o-", label="ECAD Pareto front")
    for name, (quality, ratio) in baselines.items():
        ax.scatter([ratio], [quality], marker="s")
        ax.annotate(name, (ratio, quality), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("MACs relative to no cache")
    ax.set_ylabel("quality (compositional accuracy)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


QUALITY_CHUNK = 64  # prompts per pipeline call in the quality functions, on a CPU
GPU_QUALITY_CHUNK = 1024  # ... on a GPU, where a call's cost is mostly per-step host work


def quality_chunk(pipe) -> int:
    return QUALITY_CHUNK if pipe.device.type == "cpu" else GPU_QUALITY_CHUNK


def generate_chunked(pipe, prompts: Sequence[str], seed: int, chunk: int = QUALITY_CHUNK, **kwargs) -> list:
    """pipe(prompts, seed=seed) in calls of at most `chunk` prompts, the same seeds (image i gets
    seed + i either way). One call over hundreds of prompts holds every activation at once: 512
    prompts in one call ran 257 ms per prompt on a 2-core CPU (bf16, 20 steps), in calls of 64
    137 ms."""
    images = []
    for start in range(0, len(prompts), chunk):
        result = pipe(list(prompts[start:start + chunk]), seed=seed + start, progress=False, **kwargs)
        images.extend(result.images)
    return images


def shapes_quality(pipe, n_prompts: int = 32, split: str = "validation", steps: int = 20, cfg: float | None = None,
                   height: int | None = None, width: int | None = None, seed: int = 0,
                   check_workers: int | None = None):
    """A quality function: compositional accuracy of the shapes checker on `n_prompts` prompts
    of a split (validation = calibration; the benchmark scores on the test split). On a GPU the
    checker runs in `check_workers` processes (default: the cores but two) while the next
    schedule generates; on a CPU in this process (generation already uses the cores)."""
    from pixforge.eval.shapes import CheckPool, default_check_workers
    from pixforge.shapes.world import WorldConfig, sample

    items = [sample(seed + i, split, WorldConfig()) for i in range(n_prompts)]
    captions = [item.caption for item in items]
    if check_workers is None:
        check_workers = default_check_workers(pipe.device.type)
    checker = CheckPool(check_workers)

    def evaluate(schedules: Sequence[CacheSchedule]) -> list[float]:
        pending = [checker.submit(generate_chunked(pipe, captions, seed, quality_chunk(pipe), num_inference_steps=steps,
                                                   guidance_scale=cfg, height=height, width=width, cache=schedule),
                                  captions)
                   for schedule in schedules]
        return [sum(verdicts()) / len(items) for verdicts in pending]

    return evaluate


AGREEMENT_CAP_DB = 40.0  # agreement quality = min(PSNR, cap) / cap


def agreement_quality(pipe, n_prompts: int = 32, split: str = "validation", steps: int = 20, cfg: float | None = None,
                      height: int | None = None, width: int | None = None, seed: int = 0,
                      cap_db: float = AGREEMENT_CAP_DB):
    """A lower-variance quality function: how closely a schedule reproduces the uncached
    generation of the same prompts and seeds, as the mean PSNR against it, capped at `cap_db`
    and divided by it (1.0 = identical). Accuracy on a few dozen prompts varies by several
    points between prompt sets, more than the schedules differ; agreement removes the prompts'
    own difficulty from the signal (the uncached images are generated once)."""
    import numpy as np

    from pixforge.shapes.world import WorldConfig, sample

    prompts = [sample(seed + i, split, WorldConfig()).caption for i in range(n_prompts)]

    def images(schedule):
        return [np.asarray(image, dtype=np.float64) for image in generate_chunked(
            pipe, prompts, seed, quality_chunk(pipe), num_inference_steps=steps, guidance_scale=cfg, height=height, width=width,
            cache=schedule)]

    reference = images(None)

    def evaluate(schedules: Sequence[CacheSchedule]) -> list[float]:
        scores = []
        for schedule in schedules:
            psnrs = []
            for ours, theirs in zip(images(schedule), reference):
                mse = float(np.mean((ours - theirs) ** 2))
                psnrs.append(cap_db if mse == 0 else min(cap_db, 10 * np.log10(255.0 ** 2 / mse)))
            scores.append(float(np.mean(psnrs)) / cap_db)
        return scores

    return evaluate
