"""A1111 prompt parsing and chunking, against golden cases transcribed from AUTOMATIC1111's
modules/prompt_parser.py @0674fabd (its doctests) and modules/sd_hijack_clip.py @00e09382
(`tokenize_line`: 75-token chunks, comma backtrack of 20, BREAK)."""

import pytest
from transformers import CLIPTokenizer

from impasto.prompts import CHUNK, chunk_prompt, parse_attention, parse_lora_tags
from impasto.tiny import TOKENIZER_DIR


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)


# the doctests of parse_prompt_attention, verbatim
GOLDEN = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]


@pytest.mark.parametrize("text,expected", GOLDEN)
def test_parse_attention_golden(text, expected):
    assert parse_attention(text) == expected


def test_parse_attention_break_and_square():
    assert parse_attention("a cat BREAK a dog") == [["a cat", 1.0], ["BREAK", -1], ["a dog", 1.0]]
    assert parse_attention("[faded]") == [["faded", 1 / 1.1]]
    assert parse_attention("") == [["", 1.0]]


def test_short_prompt_is_diffusers_tokenization(tok):
    (c,) = chunk_prompt(tok, "a red star on a blue background")
    assert c.ids == tok("a red star on a blue background", padding="max_length", max_length=77).input_ids
    assert c.weights == [1.0] * 77 and c.marks == []


def test_chunks_of_75_with_comma_backtrack(tok):
    words = ["red"] * 70 + [","] + ["blue"] * 10  # the chunk fills 4 tokens after the comma
    (a, b) = chunk_prompt(tok, " ".join(words))
    red, blue, comma = (tok(w, add_special_tokens=False).input_ids[0] for w in ("red", "blue", ","))
    assert a.ids[:73] == [tok.bos_token_id] + [red] * 70 + [comma] + [tok.eos_token_id]  # the comma ends it
    assert b.ids[:12] == [tok.bos_token_id] + [blue] * 10 + [tok.eos_token_id]
    assert len(a.ids) == len(b.ids) == CHUNK + 2
    (a, b) = chunk_prompt(tok, " ".join(["red"] * 40 + [","] + ["blue"] * 40))  # comma too far back: cut at 75
    assert a.ids[1:76] == [red] * 40 + [comma] + [blue] * 34 and b.ids[1:8] == [blue] * 6 + [tok.eos_token_id]


def test_break_weights_and_placeholders(tok):
    chunks = chunk_prompt(tok, "a (red:1.5) <corgi> BREAK star", ["<corgi>"], weighted=True)
    assert len(chunks) == 2
    a, b = chunks
    red = tok("red", add_special_tokens=False).input_ids[0]
    assert a.ids[2] == red and a.weights[2] == 1.5 and a.weights[1] == 1.0
    assert a.marks == [(3, "<corgi>")] and a.ids[3] == tok.unk_token_id
    assert b.ids[1] == tok("star", add_special_tokens=False).input_ids[0]
    plain = chunk_prompt(tok, "a (red:1.5) star")  # plain syntax: the brackets are text
    assert len(plain) == 1 and set(plain[0].weights) == {1.0}
    assert tok("(", add_special_tokens=False).input_ids[0] in plain[0].ids


def test_lora_tags():
    parsed = parse_lora_tags("a corgi <lora:corgi:0.8> on <lora:grass> grass")
    assert parsed.prompt == "a corgi on grass" and parsed.adapters == (("corgi", 0.8), ("grass", 1.0))


def test_model_files_and_sdxl_folders_are_named(tmp_path):
    import json

    import impasto

    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(impasto.ModelLoadError, match="model.safetensors: not a readable checkpoint"):
        impasto.Engine.from_pretrained(str(ckpt), device="cpu")
    xl = tmp_path / "xl"
    xl.mkdir()
    (xl / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(impasto.ModelLoadError, match="SDXL is not supported yet"):
        impasto.Engine.from_pretrained(str(xl), device="cpu")
