"""Text encoders: start-up, load and encode time, ours vs transformers (MiniLM).

    python benchmarks/text_encoders.py [--repeats 5] [--max-length 32] [--threads 2]

Prints a markdown table: median of N with (min–max), and the ratio baseline / ours.
- import: a new process running `from pixforge.models.text import MiniLMTextEncoder`
  vs `from transformers import AutoModel, AutoTokenizer` (wall time of the process).
- load: MiniLMTextEncoder.from_package() vs AutoTokenizer + AutoModel.from_pretrained, in process.
- encode 1 / 32 prompts: tokenize + forward, padded to --max-length, after one warm-up call.
- new process, import + load + encode 1 prompt: what a CLI call pays.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "gray"]
SHAPES = ["circle", "square", "triangle", "star"]
RELATIONS = ["to the left of", "to the right of", "above", "below"]


def captions(n: int) -> list[str]:
    out = []
    for i in range(n):
        a, b = COLOURS[i % 8], COLOURS[(3 * i + 1) % 8]
        s, t = SHAPES[i % 4], SHAPES[(i // 4 + 1) % 4]
        out.append(f"a {a} {s} {RELATIONS[(i // 2) % 4]} a {b} {t}")
    return out


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def timed_pair(base_fn, ours_fn, repeats: int) -> tuple[list[float], list[float]]:
    """Alternate baseline and ours so both see the same background load."""
    base, ours = [], []
    for _ in range(repeats):
        base += timed(base_fn, 1)
        ours += timed(ours_fn, 1)
    return base, ours


def run_process(code: str, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def fmt(times: list[float]) -> str:
    ms = [t * 1e3 for t in times]
    return f"{statistics.median(ms):.1f} ({min(ms):.1f}–{max(ms):.1f})"


def import_profile() -> tuple[float, list[str]]:
    """`-X importtime` of our import: total and the 5 costliest top-level modules; asserts no transformers."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from pixforge.models.text import MiniLMTextEncoder"],
        check=True, capture_output=True, text=True,
    )
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        rows.append((int(cumulative), name.rstrip()[1:]))  # nesting shows as extra leading spaces
    names = {name.strip() for _, name in rows}
    assert not any(n.split(".")[0] in ("transformers", "diffusers", "sentence_transformers") for n in names), names
    total = sum(c for c, name in rows if not name.startswith(" "))
    shallow = sorted((r for r in rows if not r[1].startswith("   ")), reverse=True)[:4]  # depth 0 and 1
    return total / 1e6, [f"{name.strip()} {c / 1e6:.2f} s" for c, name in shallow]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in the new processes")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)

    from pixforge.models.text import MiniLMTextEncoder, minilm_folder

    folder = minilm_folder()
    n, length = args.repeats, args.max_length
    cpu = platform.processor() or "cpu"
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print(f"# {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, max_length {length}, median of {n}")
    # Other processes on a 2-core machine make every multi-threaded op wait for a core; say so.
    print(f"# load average at start: {os.getloadavg()[0]:.2f}")

    total, top = import_profile()
    print(f"# -X importtime, `from pixforge.models.text import MiniLMTextEncoder`: {total:.2f} s; top: {', '.join(top)}")

    threads = args.threads
    rows = []
    base_import, ours_import = timed_pair(
        lambda: run_process("from transformers import AutoModel, AutoTokenizer", threads),
        lambda: run_process("from pixforge.models.text import MiniLMTextEncoder", threads), n)
    rows.append(("import (new process)", base_import, ours_import))

    from transformers import AutoModel, AutoTokenizer

    def load_base():
        return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    rows.append(("load", *timed_pair(load_base, lambda: MiniLMTextEncoder.from_package(length), n)))

    ours = MiniLMTextEncoder.from_package(length)
    tokenizer, model = load_base()

    def encode_base(prompts):
        inputs = tokenizer(prompts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        with torch.inference_mode():
            return model(**inputs).last_hidden_state

    for count in (1, 32):
        prompts = captions(count)
        encode_base(prompts), ours.encode(prompts)  # warm-up
        mine = ours.encode(prompts)
        diff = (encode_base(prompts) - mine.embeds)[mine.mask.bool()].abs().max().item()
        assert diff <= 1e-5, diff  # real tokens (padding is fp32-ill-conditioned; see tests)
        rows.append((f"encode {count} prompt{'s' if count > 1 else ''}",
                     *timed_pair(lambda: encode_base(prompts), lambda: ours.encode(prompts), n)))

    ours_cli = (
        "from pixforge.models.text import MiniLMTextEncoder\n"
        f"MiniLMTextEncoder.from_package({length}).encode(['a red circle'])"
    )
    base_cli = (
        "import torch\nfrom transformers import AutoModel, AutoTokenizer\n"
        f"t = AutoTokenizer.from_pretrained({str(folder)!r}); m = AutoModel.from_pretrained({str(folder)!r}).eval()\n"
        f"m(**t(['a red circle'], padding='max_length', max_length={length}, return_tensors='pt'))"
    )
    rows.append(("new process: import + load + encode 1",
                 *timed_pair(lambda: run_process(base_cli, threads), lambda: run_process(ours_cli, threads), n)))

    print(f"# load average at end: {os.getloadavg()[0]:.2f}")
    print("\n| step | transformers ms | pixforge ms | ratio |")
    print("|---|---|---|---|")
    for name, base, mine in rows:
        print(f"| {name} | {fmt(base)} | {fmt(mine)} | {statistics.median(base) / statistics.median(mine):.2f}x |")


if __name__ == "__main__":
    main()
