"""Request bodies (pydantic, strict) and their conversion to jobs.

Every check runs here, before a job is queued, so bad input never costs a generation: types
(strict: "20" is not 20, true is not 1), NaN/infinity, the configured limits, sizes that
are not multiples of the model's size multiple, sampler names, the step limit of the
sampler, seeds, cache specs. Limits and the models come from the validation context
(`RequestContext`), so each app validates against its own settings; an error names the
field (`loc`) and the allowed range.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from pixforge.errors import PixforgeError
from pixforge.sampling import samplers as S
from pixforge.sampling.sizes import MAX_SIDE
from pixforge.serve.queue import BatchKey, JobSpec
from pixforge.serve.settings import ServeSettings

MAX_SEED = 2**63 - 1  # the pipeline's bound (torch generators take 64-bit seeds)
RANDOM_SEED_BELOW = 2**32
# A1111 sampler names that are the same algorithm as one of ours (not "DPM++ 2M Karras":
# Karras sigmas are another schedule).
A1111_SAMPLERS = {"DPM++ 2M": "dpm++", "DDIM": "ddim", "Euler": "euler", "Euler a": "euler-a", "LCM": "lcm"}
NO_CACHE = ("", "none", "off")
# A policy spec such as 'fora:3', 'teacache:0.1', 'delta-dit:interval=2,boundary=0.5', or policies
# joined by '+' ('fora:2+cfg-cache:3+icc:16'); no paths: a schedule file named by a client would
# make the server read its own disk.
_CACHE_PART = r"[A-Za-z][A-Za-z0-9_-]*(?::[A-Za-z0-9_.,=-]*)?"
CACHE_SPEC = re.compile(rf"{_CACHE_PART}(?:\+{_CACHE_PART})*")
CACHE_SPEC_MAX_CHARS = 200
# Adaptive policies decide from the whole batch's features, so a request's image would depend
# on what it was batched with; static schedules decide per step only and are safe to batch
# (`pixforge.accel.cache.is_static`).
TASK_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
SIZE = re.compile(r" *([0-9]{1,6}) *[xX] *([0-9]{1,6}) *")  # ASCII digits only: "６４" is not 64


@dataclass(frozen=True)
class ModelInfo:
    """What validation needs to know about one served model."""

    name: str
    native_size: int
    size_multiple: int
    default_sampler: str
    default_guidance: float
    model_hash: str
    cache_supported: bool  # the pipeline's __call__ takes `cache=`
    layout_supported: bool = False  # the pipeline's __call__ takes `layout=`
    teacache_coefficients: tuple[float, ...] | None = None
    cache_schedules: dict | None = field(default=None, compare=False)  # the model's named schedules

    def max_steps(self, sampler: str, settings: ServeSettings) -> int:
        config = S.SAMPLERS[sampler]
        most = config.original_inference_steps if isinstance(config, S.LCMConfig) else settings.max_steps
        return min(most, settings.max_steps)

    def default_steps(self, sampler: str, settings: ServeSettings) -> int:
        return min(S.DEFAULT_STEPS.get(sampler, 20), self.max_steps(sampler, settings))

    def default_side(self, settings: ServeSettings) -> int:
        largest = min(settings.max_side, MAX_SIDE) // self.size_multiple * self.size_multiple
        return max(self.size_multiple, min(self.native_size, largest))

    def describe(self, settings: ServeSettings) -> dict:
        """For GET /v1/models and the web page."""
        return {
            "native_size": self.native_size,
            "size_multiple": self.size_multiple,
            "default_size": self.default_side(settings),
            "samplers": list(S.SAMPLERS),
            "default_sampler": self.default_sampler,
            "default_steps": self.default_steps(self.default_sampler, settings),
            "default_guidance": self.default_guidance,
            "cache_supported": self.cache_supported,
            "layout_supported": self.layout_supported,
            "model_hash": self.model_hash,
            "limits": {"max_side": min(settings.max_side, MAX_SIDE), "max_steps": settings.max_steps,
                       "max_images": settings.max_images, "max_guidance": settings.max_guidance,
                       "max_prompt_chars": settings.max_prompt_chars},
        }


@dataclass(frozen=True)
class RequestContext:
    settings: ServeSettings
    models: dict[str, ModelInfo]
    default_model: str


# ----------------------------------------------------------------------------- field checks
def _context(info: ValidationInfo) -> RequestContext:
    if not isinstance(info.context, RequestContext):
        raise TypeError("validate requests with context=RequestContext(...)")
    return info.context


def _model_info(info: ValidationInfo) -> ModelInfo:
    ctx = _context(info)
    return ctx.models.get(info.data.get("model") or ctx.default_model, ctx.models[ctx.default_model])


def _fail(kind: str, message: str) -> PydanticCustomError:
    # The message is pre-formatted: braces in user text must not be read as placeholders.
    return PydanticCustomError(kind, "{message}", {"message": message})


def check_text(name: str, value: str, settings: ServeSettings) -> str:
    if len(value) > settings.max_prompt_chars:
        raise _fail("too_long", f"{name} has {len(value)} characters; the limit is {settings.max_prompt_chars}")
    for position, char in enumerate(value):
        code = ord(char)
        if (code < 32 and char not in "\t\n\r") or code == 0x7F or 0xD800 <= code <= 0xDFFF:
            raise _fail("bad_character", f"{name} holds the control or surrogate character U+{code:04X} at {position}")
    return value


def check_side(name: str, value: int, model: ModelInfo, settings: ServeSettings) -> int:
    multiple, largest = model.size_multiple, min(settings.max_side, MAX_SIDE)
    if not multiple <= value <= largest:
        raise _fail("out_of_range", f"{name}={value} is out of range: use {multiple}..{largest} pixels")
    if value % multiple:
        lower, upper = value // multiple * multiple, (value // multiple + 1) * multiple
        raise _fail("not_a_multiple", f"{name}={value} is not a multiple of {multiple} (the model's VAE factor x "
                                      f"patch size); use {lower if lower >= multiple else upper} or {upper}")
    return value


def check_sampler(value: str | None) -> str | None:
    if value is None or value == "":
        return None
    if value in S.SAMPLERS:
        return value
    for alias, name in A1111_SAMPLERS.items():
        if value.lower() == alias.lower():
            return name
    raise _fail("unknown_sampler", f"sampler {value[:80]!r} is unknown; choose one of "
                                   f"{', '.join(S.SAMPLERS)} (or A1111's {', '.join(A1111_SAMPLERS)})")


def check_steps(value: int | None, info: ValidationInfo, sampler_field: str) -> int | None:
    if value is None:
        return None
    ctx, model = _context(info), _model_info(info)
    sampler = info.data.get(sampler_field) or model.default_sampler
    most = model.max_steps(sampler, ctx.settings)
    if not 1 <= value <= most:
        raise _fail("out_of_range", f"steps={value} is out of range: use 1..{most} (sampler {sampler})")
    return value


def check_guidance(value: float | None, info: ValidationInfo) -> float | None:
    if value is None:
        return None
    largest = _context(info).settings.max_guidance
    if not 0 <= value <= largest:
        raise _fail("out_of_range", f"guidance={value!r} is out of range: use 0..{largest:g} (<= 1 turns CFG off)")
    return float(value)


def check_count(name: str, value: int, settings: ServeSettings) -> int:
    if not 1 <= value <= settings.max_images:
        raise _fail("out_of_range", f"{name}={value} is out of range: use 1..{settings.max_images} images per request")
    return value


def check_seed(value: int | None, images: int) -> int | None:
    if value is None or value == -1:
        return None
    if not 0 <= value <= MAX_SEED - images:
        raise _fail("out_of_range", f"seed={value} is out of range: use 0..{MAX_SEED - images}, or -1 for a random one")
    return value


def check_cache(value: str | None, model: ModelInfo) -> str | None:
    """A cache policy spec, checked now with `pixforge.accel.cache.parse_cache_spec`; None for no cache."""
    if value is None:
        return None
    text = value.strip()
    if text.lower() in NO_CACHE:
        return None
    if len(text) > CACHE_SPEC_MAX_CHARS or not CACHE_SPEC.fullmatch(text) or text.lower().endswith(".json"):
        raise _fail("bad_cache", f"cache {text[:80]!r} is not a policy spec such as 'fora:3' or 'teacache:0.1' "
                                 f"(schedule files are not accepted over HTTP)")
    try:
        from pixforge.accel.cache import parse_cache_spec
    except ImportError:
        raise _fail("bad_cache", f"cache {text!r}: this pixforge has no feature caching; use 'none'") from None
    if not model.cache_supported:
        raise _fail("bad_cache", f"cache {text!r}: model {model.name!r}'s pipeline takes no cache policy; use 'none'")
    try:
        parse_cache_spec(text, model.teacache_coefficients, model.cache_schedules)
    except (PixforgeError, ValueError, TypeError, OverflowError) as error:  # whatever the parser chokes on is bad input
        raise _fail("bad_cache", f"cache {text!r}: {error}") from None
    return text


def check_layout(value: str | None, info) -> str | None:
    """'auto' (regional prompting from a spatial relation in the prompt) or 'none'/None; not with a cache."""
    if value is None or value == "none":
        return None
    if value != "auto":
        raise _fail("bad_layout", f"layout {value[:40]!r} is unknown: use 'auto' or 'none'")
    if info.data.get("cache") not in (None, "none"):
        raise _fail("bad_layout", "layout and cache cannot be combined: regional prompting needs every step computed")
    if not _model_info(info).layout_supported:
        raise _fail("bad_layout", f"model {_model_info(info).name!r}'s pipeline takes no layout; use 'none'")
    return value


def cache_is_batch_safe(spec: str | None, model: ModelInfo) -> bool:
    if spec is None:
        return True
    from pixforge.accel.cache import is_static, parse_cache_spec

    return is_static(parse_cache_spec(spec, model.teacache_coefficients, model.cache_schedules))


def default_guidance(spec: str | None, model: ModelInfo) -> float:
    """The guidance scale of a request that names none: its cache schedule's own, where the
    schedule records one (the scale it was searched at), else the model's."""
    if spec is not None:
        from pixforge.accel.cache import parse_cache_spec, schedule_guidance_scale

        scale = schedule_guidance_scale(parse_cache_spec(spec, model.teacache_coefficients, model.cache_schedules))
        if scale is not None:
            return scale
    return model.default_guidance


def _seeds(seed: int | None, images: int) -> tuple[int, ...]:
    first = secrets.randbelow(RANDOM_SEED_BELOW) if seed is None else seed
    return tuple(first + i for i in range(images))


def _spec(ctx: RequestContext, model_name: str | None, prompt: str, negative: str, images: int, width: int | None,
          height: int | None, steps: int | None, guidance: float | None, sampler: str | None, seed: int | None,
          cache: str | None, job_id: str | None, layout: str | None = None) -> JobSpec:
    model = ctx.models[model_name or ctx.default_model]
    sampler = sampler or model.default_sampler
    side = model.default_side(ctx.settings)
    key = BatchKey(
        width=width or side, height=height or side,
        steps=steps if steps is not None else model.default_steps(sampler, ctx.settings),
        guidance=default_guidance(cache, model) if guidance is None else guidance,
        sampler=sampler, cache=cache, layout=layout,
    )
    return JobSpec(model=model.name, key=key, prompts=(prompt,) * images, negatives=(negative,) * images,
                   seeds=_seeds(seed, images), batchable=cache_is_batch_safe(cache, model), job_id=job_id)


# ----------------------------------------------------------------------------- OpenAI
class ImagesRequest(BaseModel):
    """POST /v1/images/generations: OpenAI's fields, plus seed, steps, guidance, sampler, cache."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    model: str | None = None
    prompt: str
    negative_prompt: str = ""
    n: int = 1
    size: str | None = None
    response_format: str = "b64_json"
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    cache: str | None = None
    layout: str | None = None
    # Accepted from OpenAI clients and ignored: they select DALL-E features.
    quality: str | None = None
    style: str | None = None
    user: str | None = None

    @field_validator("model")
    @classmethod
    def _model(cls, value, info):
        ctx = _context(info)
        if value is not None and value not in ctx.models:
            raise _fail("unknown_model", f"model {value[:80]!r} is not served here; choose one of {', '.join(ctx.models)}")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value, info):
        if not value.strip():
            raise _fail("empty", "prompt is empty: describe the image")
        return check_text("prompt", value, _context(info).settings)

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, value, info):
        return check_text("negative_prompt", value, _context(info).settings)

    @field_validator("n")
    @classmethod
    def _n(cls, value, info):
        return check_count("n", value, _context(info).settings)

    @field_validator("size")
    @classmethod
    def _size(cls, value, info):
        if value is None:
            return None
        match = SIZE.fullmatch(value)
        if match is None:
            raise _fail("bad_size", f"size {value[:40]!r} is not WIDTHxHEIGHT, e.g. 512x512")
        model, settings = _model_info(info), _context(info).settings
        width, height = int(match.group(1)), int(match.group(2))
        check_side("width", width, model, settings)
        check_side("height", height, model, settings)
        return f"{width}x{height}"

    @field_validator("response_format")
    @classmethod
    def _format(cls, value):
        if value != "b64_json":
            raise _fail("unsupported", f"response_format {value[:40]!r} is not supported: use 'b64_json' "
                                       f"(the server keeps no images to link to)")
        return value

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value):
        return check_sampler(value)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value, info):
        return check_steps(value, info, "sampler")

    @field_validator("guidance")
    @classmethod
    def _guidance(cls, value, info):
        return check_guidance(value, info)

    @field_validator("seed")
    @classmethod
    def _seed(cls, value, info):
        return check_seed(value, info.data.get("n", 1))

    @field_validator("cache")
    @classmethod
    def _cache(cls, value, info):
        return check_cache(value, _model_info(info))

    @field_validator("layout")
    @classmethod
    def _layout(cls, value, info):
        return check_layout(value, info)

    def to_job_spec(self, ctx: RequestContext) -> JobSpec:
        width, height = (int(side) for side in self.size.split("x")) if self.size else (None, None)
        return _spec(ctx, self.model, self.prompt, self.negative_prompt, self.n, width, height, self.steps,
                     self.guidance, self.sampler, self.seed, self.cache, None, self.layout)


# ----------------------------------------------------------------------------- A1111
class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img: the subset of A1111's fields pixforge implements (+ cache).

    Other A1111 fields (restore_faces, enable_hr, ...) are accepted and ignored, and listed
    in the response's info as `ignored_fields`, so A1111 clients keep working.
    """

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    sampler_name: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    batch_size: int = 1
    n_iter: int = 1
    seed: int = -1
    cache: str | None = None
    layout: str | None = None
    force_task_id: str | None = None  # A1111's name: the job id, chosen by the client to poll progress

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value, info):
        return check_text(info.field_name, value, _context(info).settings)

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value, info):
        if value is None:
            return None
        return check_side(info.field_name, value, _model_info(info), _context(info).settings)

    @field_validator("sampler_name")
    @classmethod
    def _sampler(cls, value):
        return check_sampler(value)

    @field_validator("steps")
    @classmethod
    def _steps(cls, value, info):
        return check_steps(value, info, "sampler_name")

    @field_validator("cfg_scale")
    @classmethod
    def _guidance(cls, value, info):
        return check_guidance(value, info)

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, value, info):
        return check_count("batch_size", value, _context(info).settings)

    @field_validator("n_iter")
    @classmethod
    def _iterations(cls, value, info):
        settings = _context(info).settings
        check_count("n_iter", value, settings)
        batch = info.data.get("batch_size", 1)
        if batch * value > settings.max_images:
            raise _fail("out_of_range", f"batch_size x n_iter = {batch} x {value} = {batch * value} images is over "
                                        f"the limit of {settings.max_images} per request")
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value, info):
        images = info.data.get("batch_size", 1) * info.data.get("n_iter", 1)
        return -1 if check_seed(value, images) is None else value

    @field_validator("cache")
    @classmethod
    def _cache(cls, value, info):
        return check_cache(value, _model_info(info))

    @field_validator("layout")
    @classmethod
    def _layout(cls, value, info):
        return check_layout(value, info)

    @field_validator("force_task_id")
    @classmethod
    def _task_id(cls, value):
        if value is not None and not TASK_ID.fullmatch(value):
            raise _fail("bad_task_id", "force_task_id must be 8..64 characters from A-Z a-z 0-9 _ -")
        return value

    @property
    def images(self) -> int:
        return self.batch_size * self.n_iter

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})[:32]

    def to_job_spec(self, ctx: RequestContext) -> JobSpec:
        seed = None if self.seed == -1 else self.seed
        return _spec(ctx, None, self.prompt, self.negative_prompt, self.images, self.width, self.height, self.steps,
                     self.cfg_scale, self.sampler_name, seed, self.cache, self.force_task_id, self.layout)


def error_list(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """pydantic errors -> FastAPI's 422 `detail` entries, without echoing the input back."""
    return [{"loc": ["body", *error.get("loc", ())], "msg": error.get("msg", ""), "type": error.get("type", "")}
            for error in errors]


__all__ = ["ImagesRequest", "Txt2ImgRequest", "RequestContext", "ModelInfo", "A1111_SAMPLERS", "error_list"]
