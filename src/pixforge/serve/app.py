"""The FastAPI app: `create_app(pipe, settings)` serves one or more loaded pipelines.

Routes (API routes need `Authorization: Bearer KEY` when the settings hold a key):

    POST /v1/images/generations   OpenAI shape (prompt, n, size, response_format=b64_json)
                                  + negative_prompt, seed, steps, guidance, sampler, cache
    POST /sdapi/v1/txt2img        A1111 subset -> images (base64 PNG), parameters, info (JSON string)
    GET  /v1/models               the served models, their sizes, samplers and limits
    GET  /v1/jobs/{id}            a job's progress: status, step of steps, queue position
    GET  /sdapi/v1/samplers, /sdapi/v1/sd-models   for A1111 clients
    GET  /health, /metrics        liveness (no auth) and Prometheus text
    GET  /                        the web page (static files from this package; no CDN)

A request is validated (schemas.py), becomes one job in its model's queue (queue.py), and
its handler waits for the job while checking for the per-request timeout and for the
client going away; either drops the job. PNGs carry A1111 `parameters` text.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import json
import threading
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.staticfiles import StaticFiles

from pixforge import __version__
from pixforge.sampling.metadata import png_bytes
from pixforge.sampling.samplers import SAMPLERS
from pixforge.sampling.pipeline import PixArtPipeline, sampler_name
from pixforge.serve.metrics import Metrics
from pixforge.serve.queue import DuplicateJobId, Job, JobFailed, JobQueue, JobSpec, QueueClosed, QueueFull
from pixforge.serve.schemas import (
    A1111_SAMPLERS,
    ImagesRequest,
    ModelInfo,
    RequestContext,
    Txt2ImgRequest,
    error_list,
)
from pixforge.serve.settings import ServeSettings

STATIC = Path(__file__).resolve().parent / "static"
DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
SHUTDOWN_RETRY_AFTER_S = 10
# The page loads nothing from elsewhere; the policy makes any attempt fail loudly.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 409: "conflict_error", 413: "request_too_large",
               422: "invalid_request_error", 429: "rate_limit_error", 503: "server_shutting_down", 504: "timeout_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, detail: object = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.detail, self.headers = status, message, param, detail, headers


def error_response(status: int, message: str, param: str | None = None, detail: object = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error shape (`error.message`, read by its client) and FastAPI's (`detail`)."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    body = {"error": {"message": message, "type": kind, "param": param,
                      "code": status},
            "detail": message if detail is None else detail}
    return JSONResponse(body, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------
# One model: its pipeline, what validation needs to know, its queue
# ------------------------------------------------------------------------------------
class ModelService:
    def __init__(self, name: str, pipe: PixArtPipeline, settings: ServeSettings, metrics: Metrics):
        self.pipe = pipe
        self.cache_supported = "cache" in inspect.signature(pipe.__call__).parameters
        layout_supported = "layout" in inspect.signature(pipe.__call__).parameters
        self.info = ModelInfo(
            name=name, native_size=pipe.native_size, size_multiple=pipe.size_multiple,
            default_sampler=sampler_name(pipe.sampler), default_guidance=float(pipe.guidance_scale),
            model_hash=pipe.model_hash, cache_supported=self.cache_supported,
            layout_supported=layout_supported,
            teacache_coefficients=getattr(pipe, "teacache_coefficients", None),
            cache_schedules=getattr(pipe, "cache_schedules", None),
        )
        self.queue = JobQueue(name, self.run_batch, metrics, settings.max_queue, settings.max_batch,
                              settings.batch_window_s)

    def run_batch(self, jobs: list[Job], on_step) -> list[list[tuple]]:
        """One pipeline call for the batch: one prompt, negative and generator per image."""
        key = jobs[0].key
        prompts = [prompt for job in jobs for prompt in job.spec.prompts]
        negatives = [negative for job in jobs for negative in job.spec.negatives]
        generators = [torch.Generator("cpu").manual_seed(seed) for job in jobs for seed in job.spec.seeds]
        # The model's own sampler config (its folder's scheduler settings) when it is the one asked for.
        sampler = None if key.sampler == self.info.default_sampler else key.sampler
        options = {"cache": key.cache} if key.cache is not None and self.cache_supported else {}
        if key.layout is not None:
            options["layout"] = key.layout
        result = self.pipe(
            prompts, negative_prompt=negatives, height=key.height, width=key.width, num_inference_steps=key.steps,
            guidance_scale=key.guidance, sampler=sampler, generator=generators, output_type="pil", progress=False,
            callback_on_step_end=lambda step, t, x: on_step(step + 1), **options,
        )
        per_job, start = [], 0
        for job in jobs:
            stop = start + job.images
            per_job.append(list(zip(result.images[start:stop], result.metadata[start:stop])))
            start = stop
        return per_job


def _encode(images_and_infos: list[tuple]) -> list[tuple[str, object]]:
    """-> (base64 PNG with A1111 parameters, GenerationInfo) per image."""
    return [(base64.b64encode(png_bytes(image, info)).decode("ascii"), info) for image, info in images_and_infos]


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # read, so asyncio does not warn about an unretrieved exception


class ResponseCounter:
    """Counts responses by status code (a plain ASGI wrapper: it leaves `receive` alone, so
    handlers still see a client disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.inc("pixforge_http_responses_total", code=str(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


# ------------------------------------------------------------------------------------
# The app
# ------------------------------------------------------------------------------------
def create_app(pipe: PixArtPipeline | Mapping[str, PixArtPipeline], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """An app serving `pipe` (or several, by name: one queue and worker each).

    Workers start now; the app's shutdown (lifespan) closes them gracefully
    (`settings.shutdown_grace_s`). Tests pass a tiny pipeline.
    """
    pipes = dict(pipe) if isinstance(pipe, Mapping) else {pipe.model_name: pipe}
    if not pipes:
        raise ValueError("create_app needs at least one pipeline")
    metrics = Metrics()
    services = {name: ModelService(name, model, settings, metrics) for name, model in pipes.items()}
    context = RequestContext(settings, {name: s.info for name, s in services.items()}, default_model=next(iter(services)))

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(close_services, services, settings.shutdown_grace_s)

    app = FastAPI(title="pixforge", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # their pages load scripts from a CDN
    app.state.services, app.state.metrics, app.state.context, app.state.settings = services, metrics, context, settings
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(ResponseCounter, metrics=metrics)

    # --- errors ---------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError):
        return error_response(error.status, error.message, error.param, error.detail, error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        return error_response(error.status_code, str(error.detail), headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):  # Starlette re-raises it: the traceback goes to the log
        return error_response(500, "internal server error (the server log has the details)")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in error.errors()]
        return error_response(422, _summary(detail), detail=detail)

    # --- auth -----------------------------------------------------------------------
    async def require_key(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        supplied = token.strip() if scheme.lower() == "bearer" else ""
        if not hmac.compare_digest(supplied.encode(), settings.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           headers={"WWW-Authenticate": "Bearer"})

    protected = [Depends(require_key)]

    # --- request plumbing -----------------------------------------------------------
    async def parse(request: Request, model_class):
        declared = request.headers.get("content-length", "0")
        if not (declared.isascii() and declared.isdigit()):
            raise ApiError(400, f"Content-Length {declared[:20]!r} is not a number of bytes")
        if int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"the request body is over {settings.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise ApiError(413, f"the request body is over {settings.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return model_class.model_validate_json(b"".join(chunks), context=context)
        except ValidationError as error:
            detail = error_list(error.errors(include_url=False, include_input=False, include_context=False))
            param = next((str(e["loc"][1]) for e in detail if len(e["loc"]) > 1), None)
            raise ApiError(422, _summary(detail), param=param, detail=detail) from None

    async def run_job(request: Request, spec: JobSpec) -> tuple[Job, list]:
        queue = services[spec.model].queue
        try:
            job = queue.submit(spec, settings.timeout_s)
        except QueueFull as error:
            raise ApiError(429, str(error), headers={"Retry-After": str(error.retry_after)}) from None
        except QueueClosed as error:
            raise ApiError(503, str(error), headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)}) from None
        except DuplicateJobId as error:
            raise ApiError(409, str(error), param="force_task_id") from None
        waiter = asyncio.wrap_future(job.future)
        waiter.add_done_callback(_consume)
        try:
            while not job.future.done():
                remaining = job.deadline - time.monotonic()
                if remaining <= 0:
                    queue.cancel(job, "timed_out", f"the request took longer than {settings.timeout_s:g} s (--timeout)")
                    break
                await asyncio.wait({waiter}, timeout=min(DISCONNECT_POLL_S, remaining))
                if not job.future.done() and await request.is_disconnected():
                    queue.cancel(job, "cancelled", "the client went away")
                    break
        except BaseException:  # the server cancelled the handler (shutdown)
            queue.cancel(job, "cancelled", "the request was cancelled")
            raise
        error = job.future.exception()
        if error is not None:
            status = error.status if isinstance(error, JobFailed) else 500
            headers = {"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)} if status == 503 else None
            raise ApiError(status, str(error), headers=headers)
        return job, job.future.result()

    # --- generation -----------------------------------------------------------------
    @app.post("/v1/images/generations", dependencies=protected, tags=["openai"],
              openapi_extra=_body_schema(ImagesRequest))
    async def images_generations(request: Request):
        body = await parse(request, ImagesRequest)
        job, results = await run_job(request, body.to_job_spec(context))
        encoded = await run_in_threadpool(_encode, results)
        data = [{"b64_json": b64, "seed": info.seed, "parameters": info.to_parameters()} for b64, info in encoded]
        return JSONResponse({"created": int(time.time()), "job_id": job.id, "data": data},
                            headers={"X-Job-ID": job.id})

    @app.post("/sdapi/v1/txt2img", dependencies=protected, tags=["a1111"], openapi_extra=_body_schema(Txt2ImgRequest))
    async def txt2img(request: Request):
        body = await parse(request, Txt2ImgRequest)
        spec = body.to_job_spec(context)
        job, results = await run_job(request, spec)
        encoded = await run_in_threadpool(_encode, results)
        infos = [info for _, info in encoded]
        first, key = infos[0], spec.key
        parameters = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "width": key.width,
                      "height": key.height, "sampler_name": first.sampler, "steps": key.steps, "cfg_scale": key.guidance,
                      "batch_size": body.batch_size, "n_iter": body.n_iter, "seed": body.seed, "cache": key.cache or "none",
                      "layout": key.layout or "none"}
        info = {
            "prompt": body.prompt, "all_prompts": [i.prompt for i in infos],
            "negative_prompt": body.negative_prompt, "all_negative_prompts": [i.negative_prompt for i in infos],
            "seed": first.seed, "all_seeds": [i.seed for i in infos], "steps": key.steps, "cfg_scale": key.guidance,
            "width": key.width, "height": key.height, "sampler_name": first.sampler, "batch_size": body.batch_size,
            "n_iter": body.n_iter, "sd_model_name": first.model_name, "sd_model_hash": first.model_hash,
            "cache": key.cache or "none", "layout": key.layout or "none", "infotexts": [i.to_parameters() for i in infos], "job_id": job.id,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "ignored_fields": body.ignored_fields(),
        }
        return JSONResponse({"images": [b64 for b64, _ in encoded], "parameters": parameters, "info": json.dumps(info)},
                            headers={"X-Job-ID": job.id})

    # --- information ----------------------------------------------------------------
    @app.get("/v1/models", dependencies=protected, tags=["openai"])
    async def models():
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "pixforge",
                 "pixforge": service.info.describe(settings)} for name, service in services.items()]
        return {"object": "list", "data": data}

    @app.get("/v1/jobs/{job_id}", dependencies=protected, tags=["jobs"])
    async def job_status(job_id: str):
        for service in services.values():
            status = service.queue.status(job_id)
            if status is not None:
                return status
        raise ApiError(404, f"no job {job_id[:80]!r} (unknown, or finished long ago)")

    @app.get("/sdapi/v1/samplers", dependencies=protected, tags=["a1111"])
    async def a1111_samplers():
        return [{"name": name, "aliases": [alias for alias, target in A1111_SAMPLERS.items() if target == name],
                 "options": {}} for name in SAMPLERS]

    @app.get("/sdapi/v1/sd-models", dependencies=protected, tags=["a1111"])
    async def a1111_models():
        return [{"title": name, "model_name": name, "hash": s.info.model_hash, "sha256": None, "filename": "",
                 "config": None} for name, s in services.items()]

    @app.get("/health", tags=["ops"])
    async def health():
        alive = all(service.queue.alive for service in services.values())
        body = {"status": "ok" if alive else "unhealthy", "version": __version__, "models": list(services),
                "auth_required": settings.api_key is not None}
        return JSONResponse(body, status_code=200 if alive else 503)

    @app.get("/metrics", dependencies=protected, tags=["ops"], response_class=PlainTextResponse)
    async def prometheus():
        gauges = {
            "pixforge_queue_depth": {(("model", name),): s.queue.depth for name, s in services.items()},
            "pixforge_running_jobs": {(("model", name),): s.queue.running for name, s in services.items()},
        }
        return PlainTextResponse(metrics.render(gauges), media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- the page -------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def close_services(services: Mapping[str, ModelService], grace_s: float, join_s: float | None = 60.0) -> None:
    """Close every model's queue at once (each drains for `grace_s`, then fails what is left)."""
    threads = [threading.Thread(target=s.queue.close, args=(grace_s, join_s)) for s in services.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _summary(detail: list[dict]) -> str:
    """'steps: steps=500 is out of range: use 1..100; size: ...' from the error list."""
    parts = []
    for error in detail[:5]:
        where = ".".join(str(part) for part in error["loc"][1:]) or "body"
        # Our messages start with the field's name already ("steps=500 is out of range ...").
        named = error["msg"].startswith(where) and not error["msg"][len(where):len(where) + 1].isalnum()
        parts.append(error["msg"] if named else f"{where}: {error['msg']}")
    more = f" (+{len(detail) - 5} more)" if len(detail) > 5 else ""
    return "; ".join(parts) + more


def _body_schema(model_class) -> dict:
    """The OpenAPI request body of a route that parses its body itself (to validate with context)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": model_class.model_json_schema()}}}}


__all__ = ["create_app", "ModelService", "close_services"]
