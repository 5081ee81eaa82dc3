"""One bounded job queue and one worker thread per model; compatible jobs share a pipeline call.

A job is one HTTP request (one or more images). Its life, always under the queue's lock:

    queued -> running -> done | failed
    queued | running -> cancelled (client went away) | timed_out (per-request timeout) | failed (shutdown)

Each job reaches exactly one final state, and its future is settled exactly once, by
`_settle` — so no job is lost (every submitted job is settled) or run twice (a job leaves
the queue once, into one batch). The worker takes the oldest job and adds every later
queued job with the same `BatchKey` (size, steps, guidance, sampler, cache) while the
batch holds at most `max_batch` images; the oldest job always goes first, so no job
waits behind more than the jobs ahead of it. A batch whose jobs have all been cancelled
or timed out stops at the next step. Nothing here knows about HTTP or the pipeline: the
app hands in `run_batch`.
"""
from __future__ import annotations

import collections
import logging
import math
import threading
import time
import uuid
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

from pixforge.errors import PixforgeError
from pixforge.serve.metrics import Metrics

logger = logging.getLogger(__name__)

FINAL_STATES = ("done", "failed", "cancelled", "timed_out")
KEEP_FINISHED = 1024  # finished jobs kept for GET /v1/jobs/{id}


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"the queue is full ({depth} jobs waiting); retry in {retry_after} s")
        self.retry_after = retry_after


class QueueClosed(Exception):
    """The server is shutting down."""


class DuplicateJobId(Exception):
    pass


class JobFailed(Exception):
    """Why a job did not produce images; `status` is the HTTP status it maps to."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class BatchAborted(Exception):
    """Raised from the step callback to stop a batch nobody waits for any more."""


@dataclass(frozen=True)
class BatchKey:
    """Jobs with equal keys can run in one pipeline call."""

    width: int
    height: int
    steps: int
    guidance: float
    sampler: str
    cache: str | None
    layout: str | None = None  # "auto" (regional prompting) or None


@dataclass(frozen=True)
class JobSpec:
    """A validated request: one prompt, negative and seed per image."""

    model: str
    key: BatchKey
    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    seeds: tuple[int, ...]
    batchable: bool = True
    job_id: str | None = None  # chosen by the client (A1111's force_task_id), else a fresh uuid


@dataclass(eq=False)
class Job:
    spec: JobSpec
    id: str
    deadline: float  # time.monotonic() after which the request gives up
    submitted: float = field(default_factory=time.monotonic)
    state: str = "queued"
    step: int = 0
    started: float | None = None
    finished: float | None = None
    error: str | None = None
    future: Future = field(default_factory=Future, repr=False)

    @property
    def images(self) -> int:
        return len(self.spec.seeds)

    @property
    def key(self) -> BatchKey:
        return self.spec.key

    def describe(self, position: int | None = None) -> dict:
        now = time.monotonic()
        return {
            "id": self.id, "model": self.spec.model, "status": self.state, "step": self.step,
            "steps": self.key.steps, "images": self.images, "queue_position": position,
            "waited_s": round((self.started or self.finished or now) - self.submitted, 3),
            "error": self.error,
        }


# run_batch(jobs, on_step) -> one result per job; on_step(done_steps) after every step.
BatchRunner = Callable[[list[Job], Callable[[int], None]], list[object]]


class JobQueue:
    def __init__(self, name: str, run_batch: BatchRunner, metrics: Metrics, max_queue: int, max_batch: int,
                 batch_window_s: float = 0.0):
        self.name = name
        self._run_batch = run_batch
        self._metrics = metrics
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._live: dict[str, Job] = {}  # queued or running
        self._finished: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._running: list[Job] = []
        self._closing = False
        self._drain_deadline = math.inf
        self._abort_running = False
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self.submitted = 0
        self._thread = threading.Thread(target=self._work, name=f"pixforge-worker-{name}", daemon=True)
        self._thread.start()

    # --- what the app calls ---------------------------------------------------------------
    def submit(self, spec: JobSpec, timeout_s: float) -> Job:
        job_id = spec.job_id or uuid.uuid4().hex
        with self._cond:
            if self._closing:
                self._metrics.inc("pixforge_requests_rejected_total", model=self.name, reason="shutting_down")
                raise QueueClosed("the server is shutting down")
            if job_id in self._live or job_id in self._finished:
                raise DuplicateJobId(f"job id {job_id!r} is already in use; pick another force_task_id")
            if len(self._queue) >= self.max_queue:
                self._metrics.inc("pixforge_requests_rejected_total", model=self.name, reason="queue_full")
                raise QueueFull(len(self._queue), self._retry_after_locked())
            job = Job(spec=spec, id=job_id, deadline=time.monotonic() + timeout_s)
            self._queue.append(job)
            self._live[job_id] = job
            self.submitted += 1
            self._metrics.inc("pixforge_jobs_submitted_total", model=self.name)
            self._cond.notify_all()
            return job

    def cancel(self, job: Job, state: str, reason: str) -> bool:
        """Drop a job nobody waits for ('cancelled' or 'timed_out'); False if it had already ended."""
        status = 504 if state == "timed_out" else 499
        with self._cond:
            if job.state == "queued":
                self._queue.remove(job)
            settled = self._settle_locked(job, state, error=JobFailed(status, reason))
            self._cond.notify_all()  # a running batch may now have nobody left to serve
            return settled

    def status(self, job_id: str) -> dict | None:
        with self._cond:
            job = self._live.get(job_id) or self._finished.get(job_id)
            if job is None:
                return None
            position = next((i for i, queued in enumerate(self._queue) if queued is job), None)
            return job.describe(position)

    @property
    def depth(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() or self._closing

    def close(self, grace_s: float, join_s: float | None = None) -> None:
        """Stop taking jobs; run queued ones for up to `grace_s`; then fail what is left, explicitly.

        A batch still running after the grace period stops at its next step and its jobs
        fail (503); queued jobs fail without running.
        """
        with self._cond:
            if not self._closing:
                self._closing = True
                self._drain_deadline = time.monotonic() + grace_s
                self._cond.notify_all()
        self._thread.join(timeout=grace_s)
        if self._thread.is_alive():
            with self._cond:
                self._abort_running = True
                self._cond.notify_all()
            self._thread.join(timeout=join_s)
        if self._thread.is_alive():
            logger.warning("worker %s is still inside a step after shutdown; its jobs fail", self.name)
            with self._cond:
                for job in list(self._running):
                    self._settle_locked(job, "failed", error=JobFailed(503, "the server shut down before the job finished"))
                for job in self._queue:
                    self._settle_locked(job, "failed", error=JobFailed(503, "the server shut down before the job ran"))
                self._queue.clear()

    # --- the worker -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._execute(batch)

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                now = time.monotonic()
                for job in [job for job in self._queue if job.deadline <= now]:
                    self._queue.remove(job)
                    self._settle_locked(job, "timed_out", error=JobFailed(504, "the request timed out in the queue"))
                if self._closing and (not self._queue or now >= self._drain_deadline or self._abort_running):
                    for job in self._queue:
                        self._settle_locked(job, "failed", error=JobFailed(503, "the server shut down before the job ran"))
                    self._queue.clear()
                    return None
                if not self._queue:
                    self._cond.wait(timeout=1.0)
                    continue
                head = self._queue[0]
                if head.spec.batchable and self.batch_window_s > 0 and not self._closing:
                    # Give compatible jobs a moment to arrive; start over if the head left meanwhile.
                    until = now + self.batch_window_s
                    while self._compatible_images_locked(head) < self.max_batch and head.state == "queued":
                        remaining = until - time.monotonic()
                        if remaining <= 0 or self._closing:
                            break
                        self._cond.wait(timeout=remaining)
                    if head.state != "queued":
                        continue
                break
            batch, images = [head], head.images
            if head.spec.batchable:
                for job in list(self._queue)[1:]:
                    if job.spec.batchable and job.key == head.key and images + job.images <= self.max_batch:
                        batch.append(job)
                        images += job.images
            now = time.monotonic()
            for job in batch:
                self._queue.remove(job)
                job.state, job.started = "running", now
            self._running = batch
            return batch

    def _compatible_images_locked(self, head: Job) -> int:
        return sum(job.images for job in self._queue if job.spec.batchable and job.key == head.key)

    def _execute(self, batch: list[Job]) -> None:
        start = last = time.perf_counter()

        def on_step(done_steps: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if done_steps > 1:  # step 1 also holds text encoding and noise: not a step time
                self._metrics.observe("pixforge_step_seconds", now - last, model=self.name)
            last = now
            with self._cond:
                for job in batch:
                    if job.state == "running":
                        job.step = done_steps
                if self._abort_running or all(job.state != "running" for job in batch):
                    raise BatchAborted()

        error: JobFailed | None = None
        results: list[object] = []
        try:
            results = self._run_batch(batch, on_step)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} jobs")
        except BatchAborted:
            error = JobFailed(503, "the server shut down before the job finished")
        except PixforgeError as failure:  # input the checks before queueing did not catch
            error = JobFailed(422, str(failure))
        except Exception as failure:  # noqa: BLE001 - a failed batch must fail its jobs, not the worker
            logger.exception("model %s: a batch of %d jobs failed", self.name, len(batch))
            error = JobFailed(500, f"generation failed: {type(failure).__name__}: {failure}")
        seconds = time.perf_counter() - start
        self._metrics.observe("pixforge_batch_images", sum(job.images for job in batch), model=self.name)
        self._metrics.observe("pixforge_batch_seconds", seconds, model=self.name)
        with self._cond:
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            for i, job in enumerate(batch):
                if error is None:
                    self._settle_locked(job, "done", result=results[i])
                else:
                    self._settle_locked(job, "failed", error=error)
            self._running = []

    # --- bookkeeping ----------------------------------------------------------------------
    def _settle_locked(self, job: Job, state: str, result: object = None, error: JobFailed | None = None) -> bool:
        if job.state in FINAL_STATES:
            return False
        job.state, job.finished = state, time.monotonic()
        job.error = None if error is None else str(error)
        self._live.pop(job.id, None)
        self._finished[job.id] = job
        while len(self._finished) > KEEP_FINISHED:
            self._finished.popitem(last=False)
        self._metrics.inc("pixforge_jobs_total", model=self.name, status=state)
        if state == "done":
            self._metrics.observe("pixforge_job_seconds", job.finished - job.submitted, model=self.name)
        try:
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)
        except InvalidStateError:  # the waiter gave up on the future first
            pass
        return True

    def _retry_after_locked(self) -> int:
        batches_ahead = len(self._queue) / max(1, self.max_batch) + 1
        return max(1, math.ceil(batches_ahead * self._batch_seconds))


__all__ = ["JobQueue", "Job", "JobSpec", "BatchKey", "QueueFull", "QueueClosed", "DuplicateJobId", "JobFailed",
           "FINAL_STATES"]
