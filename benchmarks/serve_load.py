"""Load test for `pixforge serve` on loopback: concurrent clients against a bounded queue,
with batching off (--max-batch 1) and on, and with a queue small enough to overflow.

    python benchmarks/serve_load.py [--model DIR] [--clients 8] [--requests 25] [--repeats 1]

Each scenario starts `python -m pixforge.cli serve` (a separate process, 127.0.0.1, a free
port) on the model folder — by default a tiny random model built like the tests' — and
sends `clients x requests` OpenAI-shaped requests, each with a unique prompt and seed. A
client waits for each answer before its next request; on 429 it sleeps Retry-After and
resends. Every response is checked against its request: the job id is new, the returned
seed and the PNG's embedded parameters (prompt, seed) are the request's, and afterwards
the server's own ledger (GET /v1/jobs/{id}, /metrics) must show each job done exactly
once — 0 errors other than 429, 0 lost, 0 duplicated. Latency is per request (first send
to the 200, retries included); throughput is images per second of wall time. The batching
gain is the batched scenario's throughput over the one-at-a-time one (same load).
Prints a table; writes benchmarks/results/serve_load.json. Exit status 1 if a check fails.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "serve_load.json"
# name, --max-batch, --max-queue
START_TIMEOUT_S = 600  # loading torch and the model can crawl on a machine busy with other work
SCENARIOS = [("one at a time", 1, 16), ("batched", 8, 16), ("batched, queue 4", 8, 4)]


def build_tiny_model(folder: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers.tiny_pixforge import build_tiny_pixforge_pipeline

    return build_tiny_pixforge_pipeline(model_name="tiny-load").save_pretrained(folder / "tiny-load")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`pixforge serve` in a subprocess, stopped with SIGINT (its graceful shutdown)."""

    def __init__(self, model: Path, max_batch: int, max_queue: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "pixforge.cli", "serve", "--model", str(model), "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--log-level", "warning"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.log = tempfile.TemporaryFile(mode="w+")  # a pipe nobody reads could fill up and stall the server
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"pixforge serve exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pixforge serve did not come up in {START_TIMEOUT_S} s")
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (Linux /proc; nan elsewhere).

        Unlike wall time, it barely moves when other processes compete for the cores."""
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return math.nan
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text (0 if absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if wanted else "") + r" (\S+)"
    match = re.search("^" + pattern + "$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def png_parameters(b64: str) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return image.info.get("parameters", "")


def run_load(url: str, model: str, clients: int, requests: int, size: int, steps: int, max_seconds: float,
             seed_base: int) -> dict:
    """`clients` threads, `requests` each; returns per-request records and counts."""
    records: list[dict] = []
    lock = threading.Lock()
    deadline = time.monotonic() + max_seconds
    start_gate = threading.Barrier(clients)

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=max_seconds) as http:
            start_gate.wait()
            for i in range(requests):
                seed = seed_base + index * 1000 + i
                prompt = f"a red circle number {index} {i}"
                body = {"model": model, "prompt": prompt, "seed": seed, "size": f"{size}x{size}", "steps": steps}
                record = {"client": index, "request": i, "seed": seed, "prompt": prompt, "status": None,
                          "rejected_429": 0, "error": None, "job_id": None}
                sent = time.perf_counter()
                while time.monotonic() < deadline:
                    try:
                        response = http.post("/v1/images/generations", json=body)
                    except httpx.HTTPError as error:
                        record["error"] = f"{type(error).__name__}: {error}"
                        break
                    if response.status_code == 429:
                        record["rejected_429"] += 1
                        time.sleep(min(float(response.headers.get("Retry-After", "1")), 5.0))
                        continue
                    record["status"] = response.status_code
                    if response.status_code == 200:
                        answer = response.json()
                        record["job_id"] = answer["job_id"]
                        item = answer["data"][0]
                        parameters = png_parameters(item["b64_json"])
                        matches = (item["seed"] == seed and parameters.startswith(prompt + "\n")
                                   and f"Seed: {seed}," in parameters and len(answer["data"]) == 1)
                        if not matches:
                            record["error"] = f"response does not match its request: seed {item['seed']}, {parameters!r}"
                    else:
                        record["error"] = f"HTTP {response.status_code}: {response.text[:200]}"
                    break
                record["latency_s"] = time.perf_counter() - sent
                with lock:
                    records.append(record)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"records": records, "wall_s": time.perf_counter() - started}


def check_ledger(url: str, records: list[dict], before: str, after: str, model: str) -> dict:
    """Every answered job is done exactly once on the server, and nothing else ran."""
    ok = [r for r in records if r["status"] == 200 and r["error"] is None]
    ids = [r["job_id"] for r in ok]
    duplicated = len(ids) - len(set(ids))
    not_done = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        for job_id in set(ids):
            status = http.get(f"/v1/jobs/{job_id}").json()
            not_done += status.get("status") != "done"

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    submitted = delta("pixforge_jobs_submitted_total", model=model)
    done = delta("pixforge_jobs_total", model=model, status="done")
    # A job run twice or an extra job would show as done != answered or submitted != done.
    duplicated += int(done - len(ids)) if done > len(ids) else 0
    return {
        "job_ids_unique": duplicated == 0, "duplicated": duplicated, "server_not_done": not_done,
        "server_submitted": int(submitted), "server_done": int(done),
        "server_failed": int(delta("pixforge_jobs_total", model=model, status="failed")),
        "server_rejected_429": int(delta("pixforge_requests_rejected_total", model=model, reason="queue_full")),
        "pipeline_calls": int(delta("pixforge_batch_images_count", model=model)),
        "images_in_calls": int(delta("pixforge_batch_images_sum", model=model)),
        "step_seconds_mean": delta("pixforge_step_seconds_sum", model=model) / max(1, delta("pixforge_step_seconds_count", model=model)),
    }


def percentile_ms(run: dict, q: float) -> float:
    latencies = [r["latency_s"] for r in run["records"] if r["status"] == 200]
    return 1000 * float(np.percentile(latencies, q)) if latencies else math.nan


def summarise(name: str, max_batch: int, max_queue: int, runs: list[dict], expected: int) -> dict:
    """Per run: p50, p95, images/s; reported as the median over runs (min–max)."""
    answered = [sum(r["status"] == 200 and r["error"] is None for r in run["records"]) for run in runs]
    throughputs = [ok / run["wall_s"] for ok, run in zip(answered, runs)]
    p50s, p95s = [percentile_ms(run, 50) for run in runs], [percentile_ms(run, 95) for run in runs]
    cpu_per_image = [1000 * run["server_cpu_s"] / max(1, ok) for ok, run in zip(answered, runs)]
    errors = sum(r["error"] is not None for run in runs for r in run["records"])
    lost = sum(expected - ok for ok in answered)
    ledger = [run["ledger"] for run in runs]
    return {
        "scenario": name, "max_batch": max_batch, "max_queue": max_queue, "repeats": len(runs),
        "requests": expected * len(runs), "ok": sum(answered), "http_429": sum(r["rejected_429"] for run in runs for r in run["records"]),
        "errors_other_than_429": errors, "lost": lost, "duplicated": sum(x["duplicated"] for x in ledger),
        "server_not_done": sum(x["server_not_done"] for x in ledger),
        "server_429": sum(x["server_rejected_429"] for x in ledger),
        "latency_p50_ms": statistics.median(p50s), "latency_p50_ms_per_run": [round(x, 1) for x in p50s],
        "latency_p95_ms": statistics.median(p95s), "latency_p95_ms_per_run": [round(x, 1) for x in p95s],
        "throughput_images_per_s": statistics.median(throughputs),
        "throughput_per_run": [round(x, 2) for x in throughputs],
        "server_cpu_ms_per_image": statistics.median(cpu_per_image),
        "server_cpu_ms_per_image_per_run": [round(x, 2) for x in cpu_per_image],
        "throughput_min": min(throughputs), "throughput_max": max(throughputs),
        "mean_images_per_call": sum(x["images_in_calls"] for x in ledger) / max(1, sum(x["pipeline_calls"] for x in ledger)),
        "step_ms_mean": 1000 * statistics.mean(x["step_seconds_mean"] for x in ledger),
        "wall_s": [round(run["wall_s"], 2) for run in runs],
        "load_average_1min_per_run": [run["load_average"] for run in runs],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="Model folder (default: a tiny random model, as the tests build it).")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=25, help="Requests per client.")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1, help="Runs per scenario, interleaved across scenarios.")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the server process.")
    parser.add_argument("--max-seconds", type=float, default=180.0, help="Time limit per run; unsent requests count as lost.")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if not (1 <= args.clients <= 64 and 1 <= args.requests <= 1000 and args.max_seconds <= 1800):
        parser.error("keep the load bounded: --clients 1..64, --requests 1..1000, --max-seconds <= 1800")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # run the `finally`s: stop the server we started

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model) if args.model else build_tiny_model(Path(scratch))
        model = json.loads((model_dir / "model_index.json").read_text()).get("_pixforge", {}).get("name", model_dir.name)
        runs: dict[str, list[dict]] = {name: [] for name, _, _ in SCENARIOS}
        for repeat in range(args.repeats):
            for index, (name, max_batch, max_queue) in enumerate(SCENARIOS):
                server = Server(model_dir, max_batch, max_queue, args.threads)
                try:
                    with httpx.Client(base_url=server.url, timeout=60) as http:  # warm-up, not counted
                        for seed in range(2):
                            http.post("/v1/images/generations", json={"prompt": "warm up", "seed": seed,
                                                                      "size": f"{args.size}x{args.size}", "steps": args.steps})
                        before = http.get("/metrics").text
                    load_before, cpu_before = os.getloadavg()[0], server.cpu_seconds()
                    run = run_load(server.url, model, args.clients, args.requests, args.size, args.steps,
                                   args.max_seconds, seed_base=1_000_000 * (repeat * len(SCENARIOS) + index))
                    run["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
                    run["server_cpu_s"] = server.cpu_seconds() - cpu_before
                    after = httpx.get(f"{server.url}/metrics", timeout=30).text
                    run["ledger"] = check_ledger(server.url, run["records"], before, after, model)
                finally:
                    server.stop()
                runs[name].append(run)
                print(f"  {name} run {repeat + 1}: {run['wall_s']:.1f} s, load average {run['load_average']}",
                      file=sys.stderr)

    expected = args.clients * args.requests
    rows = [summarise(name, max_batch, max_queue, runs[name], expected) for name, max_batch, max_queue in SCENARIOS]
    # The gain per repeat (the two scenarios ran back to back, under similar background load).
    gains = [b / a for a, b in zip(rows[0]["throughput_per_run"], rows[1]["throughput_per_run"])]
    gain = statistics.median(gains)
    cpu = platform.processor() or platform.machine()
    print(f"# {cpu}, {os.cpu_count()} cores, torch threads {args.threads}, {args.clients} clients x {args.requests} "
          f"requests, {args.size}x{args.size}, {args.steps} steps, CFG on, median of {args.repeats} run(s)\n")
    print("| scenario | max batch | queue | ok / sent | 429 | errors | lost | dup | p50 ms (min–max) "
          "| p95 ms (min–max) | images/s (min–max) | server CPU ms / image (min–max) | images per call | ms per step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        p50s, p95s = row["latency_p50_ms_per_run"], row["latency_p95_ms_per_run"]
        cpus = row["server_cpu_ms_per_image_per_run"]
        print(f"| {row['scenario']} | {row['max_batch']} | {row['max_queue']} | {row['ok']} / {row['requests']} | "
              f"{row['http_429']} | {row['errors_other_than_429']} | {row['lost']} | {row['duplicated']} | "
              f"{row['latency_p50_ms']:.0f} ({min(p50s):.0f}–{max(p50s):.0f}) | "
              f"{row['latency_p95_ms']:.0f} ({min(p95s):.0f}–{max(p95s):.0f}) | "
              f"{row['throughput_images_per_s']:.1f} ({row['throughput_min']:.1f}–{row['throughput_max']:.1f}) | "
              f"{row['server_cpu_ms_per_image']:.1f} ({min(cpus):.1f}–{max(cpus):.1f}) | "
              f"{row['mean_images_per_call']:.2f} | {row['step_ms_mean']:.1f} |")
    cpu_gains = [a / b for a, b in zip(rows[0]["server_cpu_ms_per_image_per_run"], rows[1]["server_cpu_ms_per_image_per_run"])]
    cpu_gain = statistics.median(cpu_gains)
    loads = [value for row in rows for run in row["load_average_1min_per_run"] for value in run]
    print(f"\nbatching gain (batched / one at a time, images/s, per repeat): {gain:.2f}x "
          f"({min(gains):.2f}–{max(gains):.2f}); load average 1 min during the runs: "
          f"{min(loads):.2f}–{max(loads):.2f}")
    print(f"batching gain in server CPU per image (one at a time / batched, per repeat): {cpu_gain:.2f}x "
          f"({min(cpu_gains):.2f}–{max(cpu_gains):.2f})")

    failed = [row["scenario"] for row in rows
              if row["errors_other_than_429"] or row["lost"] or row["duplicated"] or row["server_not_done"]]
    result = {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()},
        "config": {"clients": args.clients, "requests_per_client": args.requests, "size": args.size,
                   "steps": args.steps, "repeats": args.repeats, "server_threads": args.threads,
                   "model": "tiny random (tests/helpers/tiny_pixforge.py)" if not args.model else str(args.model)},
        "scenarios": rows, "batching_gain": gain, "batching_gain_per_repeat": [round(g, 3) for g in gains],
        "batching_gain_server_cpu": cpu_gain, "batching_gain_server_cpu_per_repeat": [round(g, 3) for g in cpu_gains],
        "checks_passed": not failed,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    if failed:
        print(f"FAILED checks in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
