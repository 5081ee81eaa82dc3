"""Wall time of `pixforge generate "..."` on the embedded default model, as a new process,
everything included, and where the time goes.

    python benchmarks/generate_cli.py --repeats 5

Part 1 runs the real command --repeats times (1 image, 128², 20 steps) and reports the
median and range. Part 2 runs one fresh process that times each stage the command goes
through: imports, pipeline load, text encoding, the denoising steps, VAE decode, PNG save.
"""
from __future__ import annotations

import argparse
import compileall
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a red circle to the left of a blue square"

BREAKDOWN = r"""
import gc, time, json, sys
t0 = time.perf_counter()
gc.disable()  # as `pixforge generate` does while it imports and loads (cli._collector_paused)
import torch
t_torch = time.perf_counter()
from pixforge.sampling.pipeline import load_pipeline, encode_prompts
from pixforge.sampling.metadata import save_png
t_import = time.perf_counter()
pipe = load_pipeline()
gc.freeze()
gc.enable()
t_load = time.perf_counter()
steps_at = []
result = pipe(PROMPT, seed=0, progress=False, callback_on_step_end=lambda *a: steps_at.append(time.perf_counter()))
t_gen = time.perf_counter()
save_png(result.images[0], OUT + "/x.png", result.metadata[0])
t_save = time.perf_counter()
# encode and decode timed separately on the loaded pipeline (same work as inside the call)
with torch.inference_mode():
    a = time.perf_counter(); encode_prompts(pipe.text_encoder, [PROMPT], [""], pipe.max_sequence_length); b = time.perf_counter()
    pipe.vae.decode(pipe.vae.unscale_latents(result.latents)); c = time.perf_counter()
steps = [y - x for x, y in zip(steps_at, steps_at[1:])]
print(json.dumps({"import torch": t_torch - t0, "import pixforge": t_import - t_torch, "load": t_load - t_import,
                  "generate (encode + steps + decode)": t_gen - t_load, "encode": b - a,
                  "per step (median)": sorted(steps)[len(steps) // 2], "steps": len(steps_at),
                  "decode": c - b, "save png": t_save - t_gen}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # pip compiles a package's modules to bytecode when it installs it; an editable checkout run
    # with PYTHONDONTWRITEBYTECODE=1 (as some sandboxes set) would compile pixforge's sources on
    # every run instead (0.17-0.3 s measured), which no installed copy pays.
    import pixforge

    compileall.compile_dir(str(Path(pixforge.__file__).parent), quiet=1)
    start = time.perf_counter()
    for _ in range(args.repeats):
        subprocess.run([sys.executable, "-c", "pass"], check=True)
    interpreter = (time.perf_counter() - start) / args.repeats
    walls = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "pixforge.cli", "generate", PROMPT, "--seed", str(i), "-q", "-o", out],
                           check=True, capture_output=True)
            walls.append(time.perf_counter() - start)
        code = f"PROMPT = {PROMPT!r}\nOUT = {out!r}\n" + BREAKDOWN
        stages = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                           text=True).stdout.strip().splitlines()[-1])
    print(f'pixforge generate "{PROMPT}" (new process, 128², 20 steps): median {statistics.median(walls):.2f} s '
          f"(min {min(walls):.2f}, max {max(walls):.2f}) over {args.repeats} runs")
    print(f"  {'python start-up (python -c pass)':<36} {interpreter:.3f} s")
    for name, value in stages.items():
        print(f"  {name:<36} {value:.3f}" + (" s" if name != "steps" else ""))


if __name__ == "__main__":
    main()
