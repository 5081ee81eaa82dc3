"""Write the shapes world to disk: an image folder with `metadata.jsonl` (the Hugging Face
imagefolder convention: `file_name`, `text`, plus the scene as JSON fields) and prompt files
in GenEval's layout (one JSON per line: tag, prompt, include [{class, count, color, position}])."""
from __future__ import annotations

import json
from pathlib import Path

from pixforge.errors import PixforgeError
from pixforge.shapes.world import (
    CaptionSpec,
    Scene,
    WorldConfig,
    from_geneval,
    infer_category,
    parse_caption,
    render,
    sample,
    to_geneval,
)

METADATA = "metadata.jsonl"
PROMPTS = "prompts_geneval.jsonl"


def export_split(
    out_dir: str | Path, split: str, n: int, config: WorldConfig = WorldConfig(), start: int = 0,
    write_prompts: bool = True,
) -> Path:
    """Render samples start..start+n-1 of `split` into `out_dir` (PNG files + metadata.jsonl,
    and the same samples as a GenEval prompt file when `write_prompts`)."""
    if n < 1:
        raise PixforgeError(f"number of samples is {n}; it must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METADATA, "w") as metadata, \
            (open(out / PROMPTS, "w") if write_prompts else _Null()) as prompts:
        for index in range(start, start + n):
            item = sample(index, split, config)
            file_name = f"{split}_{index:06d}.png"
            render(item.scene).save(out / file_name)
            record = {"file_name": file_name, "text": item.caption, "split": split, "index": index}
            record.update(item.scene.to_json())
            metadata.write(json.dumps(record) + "\n")
            prompts.write(json.dumps(_prompt_record(item)) + "\n")
    return out


def write_geneval_prompts(path: str | Path, split: str, n: int, config: WorldConfig = WorldConfig(), start: int = 0) -> Path:
    """Prompt file only (no images): the `split` samples in GenEval's layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        for index in range(start, start + n):
            handle.write(json.dumps(_prompt_record(sample(index, split, config))) + "\n")
    return path


def _prompt_record(item) -> dict:
    """GenEval layout plus the canvas size, so generation can match the ground truth's aspect."""
    record = to_geneval(item.scene.spec(), item.caption, item.scene.category)
    record.update(width=item.scene.width, height=item.scene.height)
    return record


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise PixforgeError(f"{path} does not exist; expected a JSON-lines file")
    records = []
    with open(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise PixforgeError(f"{path}:{line_number} is not valid JSON: {error}") from None
    return records


def record_spec(record: dict) -> tuple[CaptionSpec, str]:
    """(spec, category) of one metadata or prompt record: from its GenEval `include` list when
    present, from its scene fields when present, otherwise parsed from its caption."""
    if "include" in record:
        spec = from_geneval(record)
    elif "objects" in record:
        spec = Scene.from_json(record).spec()
    else:
        text = record.get("text", record.get("prompt"))
        if text is None:
            raise PixforgeError(f"record {record!r} has no 'text', 'prompt', 'include' or 'objects'")
        spec = parse_caption(text)
    category = record.get("category") or record.get("tag") or infer_category(spec)
    return spec, category


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def write(self, text: str) -> None:
        return None
