"""Generation metadata: one record per image, written into PNGs the way AUTOMATIC1111 does.

A PNG's `parameters` text chunk holds

    PROMPT
    Negative prompt: NEGATIVE
    Steps: 20, Sampler: dpm++, CFG scale: 4.5, Seed: 1, Size: 128x128, Model: name, Model hash: abcd1234

(the negative line only when there is a negative prompt, as A1111 writes it), so tools
that read A1111 images (web UIs, image browsers, civitai) show the settings, and
`read_png_parameters` gives them back.
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from pixforge.errors import PixforgeError

PNG_KEY = "parameters"
NEGATIVE_PREFIX = "Negative prompt: "
# A1111's own pattern for "Key: value, Key: "quoted, value", ..." on the last line.
_PARAM_PATTERN = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_SIZE_PATTERN = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class GenerationInfo:
    """What produced one image; enough to generate it again."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_name: str
    model_hash: str
    cache: str = "none"  # feature-cache policy (pixforge.accel.cache spec)
    layout: str = "none"  # regional prompting (pixforge.sampling.regions.Layout.describe)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_parameters(self) -> str:
        """The A1111 `parameters` text."""
        fields = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", _number(self.cfg_scale)),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model", self.model_name),
            ("Model hash", self.model_hash),
        ]
        if self.cache != "none":
            fields.append(("Cache", self.cache))
        if self.layout != "none":
            fields.append(("Layout", self.layout))
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(NEGATIVE_PREFIX + self.negative_prompt)
        lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields))
        return "\n".join(lines)

    @classmethod
    def from_parameters(cls, text: str) -> "GenerationInfo":
        """Parse A1111 `parameters` text back (the inverse of `to_parameters`)."""
        lines = text.strip("\n").split("\n")
        if len(lines) < 2:
            raise PixforgeError(f"not A1111 parameters text (need a prompt line and a settings line): {text!r}")
        settings = {key.strip(): _unquote(value) for key, value in _PARAM_PATTERN.findall(lines[-1])}
        missing = [key for key in ("Steps", "Sampler", "CFG scale", "Seed", "Size") if key not in settings]
        if missing:
            raise PixforgeError(f"A1111 parameters lack {', '.join(missing)}: {lines[-1]!r}")
        prompt_lines, negative_lines, in_negative = [], [], False
        for line in lines[:-1]:
            if line.startswith(NEGATIVE_PREFIX) and not in_negative:
                in_negative = True
                line = line[len(NEGATIVE_PREFIX):]
            (negative_lines if in_negative else prompt_lines).append(line)
        size = _SIZE_PATTERN.match(settings["Size"])
        if size is None:
            raise PixforgeError(f"Size {settings['Size']!r} is not WIDTHxHEIGHT")
        return cls(
            prompt="\n".join(prompt_lines),
            negative_prompt="\n".join(negative_lines),
            steps=int(settings["Steps"]),
            sampler=settings["Sampler"],
            cfg_scale=float(settings["CFG scale"]),
            seed=int(settings["Seed"]),
            width=int(size.group(1)),
            height=int(size.group(2)),
            model_name=settings.get("Model", ""),
            model_hash=settings.get("Model hash", ""),
            cache=settings.get("Cache", "none"),
            layout=settings.get("Layout", "none"),
        )


def _number(value: float) -> str:
    return f"{value:g}" if float(value) == int(value) and abs(value) < 1e15 else repr(float(value))


def _quote(value: object) -> str:
    # A1111 quotes a value that would break the "k: v, k: v" line.
    text = str(value)
    return json.dumps(text) if any(ch in text for ch in ',:"\n') else text


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def png_bytes(image, info: GenerationInfo) -> bytes:
    """`image` (PIL) encoded as a PNG carrying `info` in its `parameters` chunk."""
    from PIL.PngImagePlugin import PngInfo

    chunk = PngInfo()
    chunk.add_text(PNG_KEY, info.to_parameters())
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=chunk)
    return buffer.getvalue()


def save_png(image, path: str | Path, info: GenerationInfo) -> Path:
    """Write `image` (PIL) as a PNG carrying `info` in its `parameters` chunk, atomically."""
    from pixforge.models.convert import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, png_bytes(image, info))
    return path


def read_png_parameters(path: str | Path) -> GenerationInfo:
    """The `GenerationInfo` stored in a PNG written by `save_png` (or by A1111)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(PNG_KEY)
    if text is None:
        raise PixforgeError(f"{path} has no '{PNG_KEY}' text chunk")
    return GenerationInfo.from_parameters(text)


__all__ = ["GenerationInfo", "png_bytes", "save_png", "read_png_parameters", "PNG_KEY"]
