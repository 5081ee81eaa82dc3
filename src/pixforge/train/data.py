"""Training data: the shapes world or an imagefolder, aspect buckets, and a feature cache.

Every batch holds images of one size (a bucket). The order of batches is a pure function
of (seed, epoch), so a resumed run sees exactly the batches it would have seen, and a
global batch is split across ranks in a fixed way, so N processes train on the same
global batches as one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pixforge.errors import PixforgeError

logger = logging.getLogger(__name__)

# Height/width ratios of PixArt's aspect-ratio bins, thinned to the range used at small sizes.
BUCKET_RATIOS = (0.5, 0.6, 0.78, 1.0, 1.29, 1.67, 2.0)


def bucket_sizes(resolution: int, multiple: int = 16, ratios=BUCKET_RATIOS) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution² pixels, sides multiples of `multiple`."""
    area = resolution * resolution
    sizes = []
    for ratio in ratios:  # ratio = height / width
        width = max(multiple, int(round(math.sqrt(area / ratio) / multiple)) * multiple)
        height = max(multiple, int(round(math.sqrt(area * ratio) / multiple)) * multiple)
        if (width, height) not in sizes:
            sizes.append((width, height))
    return sizes


def nearest_bucket(width: int, height: int, sizes: list[tuple[int, int]]) -> int:
    ratio = math.log(height / width)
    return min(range(len(sizes)), key=lambda i: abs(math.log(sizes[i][1] / sizes[i][0]) - ratio))


def to_tensor(image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def resize_cover_crop(image, width: int, height: int):
    """Bicubic resize to cover (width, height), then centre crop (PixArt's multi-scale recipe)."""
    from PIL import Image

    scale = max(width / image.width, height / image.height)
    resized = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


class ShapesDataset:
    """`num_samples` samples of the shapes world's split; sample i has a fixed bucket and caption."""

    def __init__(self, num_samples: int, sizes: list[tuple[int, int]], split: str = "train",
                 paraphrase: float = 0.0, seed: int = 0, background_prob: float = 0.0, mix: str = ""):
        from pixforge.shapes.world import WorldConfig, parse_mix

        self.num_samples, self.sizes, self.split = num_samples, sizes, split
        self.paraphrase, self.seed, self.background_prob = paraphrase, seed, background_prob
        weights = parse_mix(mix)
        # The canonical spelling of a non-uniform mix, for the fingerprint ("" when uniform).
        self.mix = ",".join(f"{c}={w:g}" for c, w in weights if w != 1.0)
        self.worlds = {
            (size, para): WorldConfig(canvas_sizes=(size,), mix=weights, paraphrase=para, seed=seed,
                                      background_prob=background_prob)
            for size in sizes for para in (False, True)
        }
        self.buckets = [i % len(sizes) for i in range(num_samples)]
        self.skipped = 0

    def fingerprint(self) -> str:
        extra = f":bg{self.background_prob}" if self.background_prob else ""  # old keys stay valid
        extra += f":mix[{self.mix}]" if self.mix else ""
        return f"shapes:{self.split}:{self.num_samples}:{self.sizes}:{self.paraphrase}:{self.seed}{extra}"

    def _is_paraphrased(self, index: int) -> bool:
        # A fixed, well-mixed fraction of indices (golden-ratio sequence).
        return (index * 0.6180339887498949) % 1.0 < self.paraphrase

    def sample(self, index: int):
        from pixforge.shapes.world import sample

        world = self.worlds[(self.sizes[self.buckets[index]], self._is_paraphrased(index))]
        return sample(index, self.split, world)

    def caption(self, index: int) -> str:
        return self.sample(index).caption

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        item = self.sample(index)
        return to_tensor(item.image), item.caption

    def __len__(self) -> int:
        return self.num_samples


class ImageFolderDataset:
    """A Hugging Face imagefolder: images + metadata.jsonl with `file_name` and `text`."""

    def __init__(self, folder: str | Path, sizes: list[tuple[int, int]], buckets: bool = True):
        from PIL import Image

        self.folder, self.sizes = Path(folder), sizes
        meta = self.folder / "metadata.jsonl"
        if not meta.is_file():
            raise PixforgeError(f"{meta} not found: an image folder needs metadata.jsonl with file_name and text")
        self.records, self.buckets, self.skipped = [], [], 0
        for line_number, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                path = self.folder / record["file_name"]
                text = str(record["text"])
                with Image.open(path) as image:
                    width, height = image.size
            except (json.JSONDecodeError, KeyError) as error:
                raise PixforgeError(f"{meta}:{line_number} is not a valid record ({error})") from error
            except (OSError, ValueError) as error:
                logger.warning("skipping unreadable image %s (%s)", record.get("file_name"), error)
                self.skipped += 1
                continue
            self.records.append((path, text))
            self.buckets.append(nearest_bucket(width, height, sizes) if buckets else 0)
        if not self.records:
            raise PixforgeError(f"no readable images in {self.folder}")

    def fingerprint(self) -> str:
        digest = hashlib.sha256((self.folder / "metadata.jsonl").read_bytes()).hexdigest()[:16]
        return f"folder:{self.folder.resolve()}:{digest}:{self.sizes}"

    def caption(self, index: int) -> str:
        return self.records[index][1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from PIL import Image

        width, height = self.sizes[self.buckets[index]]
        for offset in range(len(self.records)):  # an image that fails to decode is replaced, counted
            candidate = (index + offset) % len(self.records)
            if self.buckets[candidate] != self.buckets[index]:
                continue
            path, text = self.records[candidate]
            try:
                with Image.open(path) as image:
                    return to_tensor(resize_cover_crop(image.convert("RGB"), width, height)), text
            except (OSError, ValueError) as error:
                logger.warning("skipping corrupt image %s (%s)", path, error)
                self.skipped += 1
        raise PixforgeError(f"no decodable image left in bucket {width}x{height}")

    def __len__(self) -> int:
        return len(self.records)


def dataset_for(config):
    """The dataset a TrainConfig describes (every data field of it, in one place)."""
    return build_dataset(config.data, config.resolution, config.buckets, config.num_samples, config.paraphrase,
                         config.seed, config.background_prob, config.category_mix)


def build_dataset(data: str, resolution: int, buckets: bool, num_samples: int, paraphrase: float, seed: int,
                  background_prob: float = 0.0, mix: str = ""):
    sizes = bucket_sizes(resolution) if buckets else [(resolution, resolution)]
    if data == "shapes":
        return ShapesDataset(num_samples, sizes, paraphrase=paraphrase, seed=seed, background_prob=background_prob,
                             mix=mix)
    return ImageFolderDataset(data, sizes, buckets)


def indices_by_bucket(buckets) -> dict[int, list[int]]:
    """{bucket: [sample indices in it]}, buckets in ascending order."""
    grouped: dict[int, list[int]] = {}
    for index, bucket in enumerate(buckets):
        grouped.setdefault(bucket, []).append(index)
    return dict(sorted(grouped.items()))


@dataclass(frozen=True)
class BucketBatches:
    """Global batches of one bucket each, in an order fixed by (seed, epoch)."""

    buckets: tuple[int, ...]
    batch_size: int
    seed: int

    def epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        batches = []
        for members in indices_by_bucket(self.buckets).values():
            order = torch.randperm(len(members), generator=generator).tolist()
            shuffled = [members[i] for i in order]
            # A short tail joins the next epoch's shuffle rather than forming a smaller batch.
            for start in range(0, len(shuffled) - self.batch_size + 1, self.batch_size):
                batches.append(shuffled[start:start + self.batch_size])
        order = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in order]

    def batches_per_epoch(self) -> int:
        return sum(len(members) // self.batch_size for members in indices_by_bucket(self.buckets).values())


def shard(batch: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous share of a global batch."""
    per_rank = len(batch) // world_size
    return batch[rank * per_rank:(rank + 1) * per_rank]


# ------------------------------------------------------------------------------------------
# Feature cache: text embeddings per unique caption and VAE latents per sample, on disk,
# keyed by the encoder / VAE weights and the dataset, so later runs skip the encoding.
# ------------------------------------------------------------------------------------------
ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # the weights that make a VAE's latents


def encoder_digest(vae_folder: str | Path) -> str:
    """Digest of the VAE weights the latents depend on (encoder + quant_conv: names, dtypes,
    shapes, bytes). A decoder-only fine-tune leaves it, and so the latent cache, unchanged."""
    from safetensors import safe_open

    digest = hashlib.sha256()
    paths = sorted(Path(vae_folder).glob("*.safetensors"))
    if not paths:
        raise PixforgeError(f"{vae_folder} holds no .safetensors weights: expected a trained VAE folder")
    for path in paths:
        with safe_open(path, "pt") as handle:
            for name in sorted(k for k in handle.keys() if k.startswith(ENCODER_PREFIXES)):
                tensor = handle.get_tensor(name).contiguous()
                digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def text_cache_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / f"text-{key}.safetensors"


def cached_text_features(cache_dir: Path, key: str, captions, encode, max_tokens: int, batch: int = 256):
    """-> (caption ids per sample (N,), embeds (U, L, D), mask (U, L)); computed once per key.

    captions: every sample's caption, or a function returning them (called only on a miss:
    the shapes world samples a scene per caption)."""
    from safetensors.torch import load_file

    from pixforge.models.convert import atomic_save_safetensors

    path = text_cache_path(cache_dir, key)
    if path.exists():
        data = load_file(path)
        logger.info("text features from cache %s", path)
        return data["ids"], data["embeds"], data["mask"], True
    captions = captions() if callable(captions) else captions
    unique = sorted(set(captions))
    position = {c: i for i, c in enumerate(unique)}
    embeds, masks = [], []
    for start in range(0, len(unique), batch):
        out = encode(unique[start:start + batch], max_tokens)
        embeds.append(out.embeds.to(device="cpu", dtype=torch.bfloat16))
        masks.append(out.mask.to(device="cpu", dtype=torch.int8))
    ids = torch.tensor([position[c] for c in captions], dtype=torch.int32)
    data = {"ids": ids, "embeds": torch.cat(embeds), "mask": torch.cat(masks)}
    atomic_save_safetensors(data, path)
    return data["ids"], data["embeds"], data["mask"], False


class _Chunks(torch.utils.data.Dataset):
    """Index chunks of a dataset for DataLoader workers: item k -> fn over chunk k."""

    def __init__(self, dataset, chunks: list[list[int]], images: bool):
        self.dataset, self.chunks, self.images = dataset, chunks, images

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, k: int):
        if self.images:
            return render_images(self.dataset, self.chunks[k])
        return [self.dataset.caption(i) for i in self.chunks[k]]


def render_images(dataset, indices) -> torch.Tensor:
    """The images of `indices` stacked into one batch (B, 3, H, W) (one bucket: one size)."""
    return torch.stack([dataset[i][0] for i in indices])


def _map_chunks(dataset, chunks: list[list[int]], images: bool, workers: int):
    """Yield per-chunk results in order, rendered by `workers` processes (0 = this one)."""
    if workers <= 0:
        source = _Chunks(dataset, chunks, images)
        yield from (source[k] for k in range(len(chunks)))
        return
    loader = torch.utils.data.DataLoader(
        _Chunks(dataset, chunks, images), batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=4, persistent_workers=False,
    )
    yield from loader


def all_captions(dataset, workers: int = 0, chunk: int = 2048) -> list[str]:
    """Every sample's caption, in index order (the shapes world samples a scene per caption)."""
    indices = list(range(len(dataset)))
    chunks = [indices[i:i + chunk] for i in range(0, len(indices), chunk)]
    return [caption for part in _map_chunks(dataset, chunks, images=False, workers=workers) for caption in part]


def cached_latents(cache_dir: Path, key: str, dataset, encode, batch: int = 64, progress: bool = True,
                   workers: int = 0):
    """-> dict sample index -> latent (C, h, w) in bf16, encoded once per key (posterior mode).

    workers > 0 renders/decodes the images in that many DataLoader processes while `encode`
    (on whatever device the VAE lives) runs; the result is identical to workers = 0.
    """
    from safetensors.torch import load_file

    from pixforge.models.convert import atomic_save_safetensors

    path = cache_dir / f"latents-{key}.safetensors"
    if path.exists():
        data = load_file(path)
        logger.info("latents from cache %s", path)
        return data, True
    from tqdm import tqdm

    data = {}
    bar = tqdm(total=len(dataset.buckets), desc="encoding latents (once, cached)", disable=not progress)
    for bucket, members in indices_by_bucket(dataset.buckets).items():
        chunks = [members[start:start + batch] for start in range(0, len(members), batch)]
        encoded = []
        for images in _map_chunks(dataset, chunks, images=True, workers=workers):
            encoded.append(encode(images).to(device="cpu", dtype=torch.bfloat16))
            bar.update(len(images))
        data[f"bucket{bucket}"] = torch.cat(encoded)
        data[f"index{bucket}"] = torch.tensor(members, dtype=torch.int64)
    bar.close()
    atomic_save_safetensors(data, path)
    return data, False
