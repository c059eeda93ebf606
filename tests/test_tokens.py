"""Learned tokens are injected per row, equal to diffusers' load_textual_inversion, without
growing the tokenizer or the embedding table."""

import safetensors.torch
import torch

from impasto.plan import encode_with_tokens, tokenize_with_placeholders


def test_plain_text_equals_tokenizer(engine):
    tok = engine.base.tokenizer
    for text in ["a red star", "", "two small red stars on a blue background, striped", "word " * 100]:
        ids, marks = tokenize_with_placeholders(tok, text, [])
        assert ids == tok(text, padding="max_length", max_length=77, truncation=True).input_ids
        assert marks == []


def test_injection_equals_textual_inversion(engine, pipe, tmp_path):
    te = engine.base.text_encoder
    dim = te.get_input_embeddings().weight.shape[1]
    torch.manual_seed(0)
    emb_a, emb_b = torch.randn(dim), torch.randn(dim)
    safetensors.torch.save_file({"<corgi>": emb_a}, str(tmp_path / "corgi.safetensors"))
    pipe.load_textual_inversion(str(tmp_path / "corgi.safetensors"), token="<corgi>")
    n_vocab = engine.base.tokenizer.__len__()
    texts = ["a photo of a <corgi> on the beach", "a photo of a <corgi> on the beach", "<corgi>"]
    out = encode_with_tokens(engine.base.tokenizer, te, texts, [{"<corgi>": emb_a}, {"<corgi>": emb_b}, {"<corgi>": emb_a}],
                             "cpu")
    for i in (0, 2):
        ref, _ = pipe.encode_prompt(texts[i], "cpu", 1, False)
        assert torch.allclose(out[i], ref[0], atol=1e-5)
    # the same placeholder with another embedding in the same batch does not interfere
    assert (out[0] - out[1]).abs().max() > 1e-2
    plain, _ = pipe.encode_prompt("a photo of a dog", "cpu", 1, False)  # no placeholder: plain diffusers
    assert torch.allclose(encode_with_tokens(engine.base.tokenizer, te, ["a photo of a dog"], [{}], "cpu"), plain)
    assert len(engine.base.tokenizer) == n_vocab
    assert te.get_input_embeddings().weight.shape[0] == n_vocab
