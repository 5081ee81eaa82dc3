"""Counters, gauges and histograms in Prometheus' text format (no client library needed).

    metrics.inc("pixforge_jobs_total", model="tiny", status="done")
    metrics.observe("pixforge_step_seconds", 0.012, model="tiny")
    metrics.render(gauges)   # -> text/plain; version=0.0.4
"""
from __future__ import annotations

import bisect
import math
import threading
from collections import defaultdict

HELP = {
    "pixforge_queue_depth": ("gauge", "Jobs waiting in the model's queue (the running batch not counted)."),
    "pixforge_running_jobs": ("gauge", "Jobs in the batch the model's worker is running."),
    "pixforge_jobs_submitted_total": ("counter", "Jobs accepted into the queue."),
    "pixforge_jobs_total": ("counter", "Jobs finished, by final status (done, failed, cancelled, timed_out)."),
    "pixforge_requests_rejected_total": ("counter", "Requests refused before queueing (queue_full -> 429, shutting_down -> 503)."),
    "pixforge_http_responses_total": ("counter", "HTTP responses by status code."),
    "pixforge_step_seconds": ("histogram", "Seconds per denoising step of a batch (step 1, which also encodes text, excluded)."),
    "pixforge_batch_seconds": ("histogram", "Seconds per pipeline call (one batch)."),
    "pixforge_batch_images": ("histogram", "Images per pipeline call."),
    "pixforge_job_seconds": ("histogram", "Seconds from submission to result, for jobs that finished."),
}
BUCKETS = {
    "pixforge_step_seconds": (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    "pixforge_batch_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    "pixforge_batch_images": (1, 2, 4, 8, 16, 32, 64),
    "pixforge_job_seconds": (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
}


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""

    def escape(value: object) -> str:
        return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{key}="{escape(value)}"' for key, value in sorted(labels.items())) + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(float(value)) if isinstance(value, float) else str(value)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        self._histograms: dict[str, dict[tuple, list]] = defaultdict(dict)  # name -> labels -> [counts, sum, count]

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += amount

    def observe(self, name: str, value: float, **labels: str) -> None:
        buckets = BUCKETS[name]
        with self._lock:
            series = self._histograms[name].setdefault(tuple(sorted(labels.items())), [[0] * len(buckets), 0.0, 0])
            index = bisect.bisect_left(buckets, value)
            if index < len(buckets):
                series[0][index] += 1
            series[1] += value
            series[2] += 1

    def counter(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters[name].get(tuple(sorted(labels.items())), 0)

    def histogram(self, name: str, **labels: str) -> tuple[float, int]:
        """(sum, count) of one histogram series."""
        with self._lock:
            series = self._histograms[name].get(tuple(sorted(labels.items())))
            return (0.0, 0) if series is None else (series[1], series[2])

    def render(self, gauges: dict[str, dict[tuple, float]]) -> str:
        """The exposition text; `gauges` (name -> labels -> value) are read by the caller at scrape time."""
        lines: list[str] = []
        with self._lock:
            for name, (kind, text) in HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "gauge":
                    for labels, value in sorted(gauges.get(name, {}).items()):
                        lines.append(f"{name}{_labels(dict(labels))} {_number(value)}")
                elif kind == "counter":
                    for labels, value in sorted(self._counters.get(name, {}).items()):
                        lines.append(f"{name}{_labels(dict(labels))} {_number(value)}")
                else:
                    for labels, (counts, total, count) in sorted(self._histograms.get(name, {}).items()):
                        cumulative = 0
                        for bound, bucket_count in zip(BUCKETS[name], counts):
                            cumulative += bucket_count
                            lines.append(f"{name}_bucket{_labels({**dict(labels), 'le': _number(float(bound))})} {cumulative}")
                        lines.append(f"{name}_bucket{_labels({**dict(labels), 'le': '+Inf'})} {count}")
                        lines.append(f"{name}_sum{_labels(dict(labels))} {_number(total)}")
                        lines.append(f"{name}_count{_labels(dict(labels))} {count}")
        return "\n".join(lines) + "\n"


__all__ = ["Metrics"]
