"""Prompts as AUTOMATIC1111 reads them: emphasis weights, BREAK, 75-token chunks, clip skip, and
the `<lora:NAME:W>` extra-network tags. One parser, used by the engine, the CLI and the server.

References (A1111 cannot be installed here; the tests hold golden cases transcribed from them):
  modules/prompt_parser.py `parse_prompt_attention`  @0674fabd0d82c69c02ff362762815c4536687b95
  modules/sd_hijack_clip.py `tokenize_line`, `process_tokens` and modules/sd_emphasis.py
  `EmphasisOriginal` (scale each token's encoding, then restore the chunk's original mean)
                                                      @00e09382cd85c77ac35545c7264855823dfc2eb1
compel weights differently (no mean restore; `.blend()`/`++` syntax), so its results differ.

Chunks (A1111): the prompt's tokens are cut into chunks of 75; each chunk is encoded as
[BOS, tokens, EOS, PAD...] (77 positions; SD 1.x pads with EOS, so this is also A1111's
[BOS, tokens, EOS...] there) and the encodings are concatenated. When a chunk fills up within 20
tokens after a comma, the tokens after the comma move to the next chunk. A guidance branch with
fewer chunks than its request's longest is padded with encodings of the empty chunk (A1111's
"pad prompt/negative prompt to be same length"), so every branch of a request has 77 * chunks keys.
A prompt of at most 75 tokens is one chunk: exactly diffusers' `encode_prompt`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import RequestError

CHUNK = 75  # tokens per chunk, without BOS and EOS
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default

# ------------------------------------------------------------------ <lora:NAME:W>
# A1111's extra-network syntax: <kind:arg1:arg2...>. `lyco` is an alias of `lora` since A1111 1.5.
EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_KINDS = ("lora", "lyco")


class NotSupportedError(RequestError):
    """A request names a feature that impasto has not landed yet (answered 422)."""


@dataclass(frozen=True)
class PromptAdapters:
    """A prompt with its `<lora:...>` tags taken out: the text the model sees and the adapters."""

    prompt: str
    adapters: tuple  # ((name, scale), ...) in prompt order


def parse_lora_tags(prompt: str) -> PromptAdapters:
    """Take A1111 `<lora:NAME>` / `<lora:NAME:W>` tags out of `prompt`.

    Semantics:
      "a corgi <lora:corgi:0.8> on grass" -> PromptAdapters("a corgi on grass", (("corgi", 0.8),))
      the default multiplier is 1.0 (A1111's extra_networks_default_multiplier); whitespace
      runs left by a removed tag collapse to one space (CLIP's tokenizer does the same).

    Raises NotSupportedError for what A1111 accepts but impasto cannot do yet: separate text
    encoder / UNet multipliers (`<lora:n:0.5:0.8>`), step ranges (`start=`, `end=`) and other
    network kinds (`<hypernet:...>`); RequestError for a multiplier that is not a number.
    """
    adapters = []

    def take(m: re.Match) -> str:
        kind, args = m.group(1).lower(), m.group(2).split(":")
        if kind not in LORA_KINDS:
            raise NotSupportedError(f"prompt: <{m.group(1)}:...> networks are not supported (only <lora:NAME:W>)")
        name, rest = args[0].strip(), [a.strip() for a in args[1:]]
        named = [a for a in rest if "=" in a]
        if named:
            raise NotSupportedError(f"prompt: <lora:{name}:...> options {named} (step-scheduled adapters) are not "
                                    f"supported yet")
        if len(rest) > 1:
            raise NotSupportedError(f"prompt: <lora:{name}:{':'.join(rest)}>: separate text-encoder and UNet "
                                    f"multipliers are not supported yet; give one multiplier")
        try:
            scale = float(rest[0]) if rest and rest[0] else 1.0
        except ValueError:
            raise RequestError(f"prompt: <lora:{name}:{rest[0]}>: the multiplier is not a number") from None
        adapters.append((name, scale))
        return " "

    text = EXTRA_NETWORK.sub(take, prompt)
    return PromptAdapters(" ".join(text.split()), tuple(adapters))


# ------------------------------------------------------------------ emphasis
_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:([+-]?[.\d]+)\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_attention(text: str) -> list[list]:
    """Semantics: A1111's `parse_prompt_attention`: [[text, weight], ...] with runs of equal
    weight merged; `(x)` multiplies by 1.1, `[x]` by 1/1.1, `(x:w)` by w, `\\(` `\\)` `\\[` `\\]`
    `\\\\` are literal characters, unbalanced brackets close at the end, and each BREAK is the
    entry ["BREAK", -1]. "an (important) word" -> [["an ", 1.0], ["important", 1.1], [" word", 1.0]].
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_brackets.append(len(res))
        elif piece == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif piece == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif piece == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, part in enumerate(re.split(_BREAK, piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


# ------------------------------------------------------------------ chunks
@dataclass
class Chunk:
    """One 77-position chunk: token ids, per-position multipliers, and the placeholder positions
    [(position, placeholder), ...] whose input embeddings are injected."""

    ids: list
    weights: list
    marks: list
    length: int = CHUNK + 2  # positions up to and including the EOS; the rest is padding


def _as_word(p: str) -> str:
    """The regex of placeholder `p`: a word-like token (a textual-inversion "easyneg") matches only
    as a whole word; "<corgi>" anywhere."""
    return (r"(?<!\w)" if re.match(r"\w", p) else "") + re.escape(p) + (r"(?!\w)" if re.search(r"\w$", p) else "")


def chunk_prompt(tokenizer, text: str, placeholders=(), *, weighted: bool = False, widths=None) -> list[Chunk]:
    """Semantics: A1111's `tokenize_line` (emphasis "Original" when `weighted`, "None" otherwise):
    the prompt as chunks of 77 = [BOS, <=75 tokens, EOS, PAD...] with per-token multipliers; a
    placeholder of `placeholders` (a learned token, engine/plan.py) is one position holding the
    unk id. Never empty: "" is one chunk.
    """
    parsed = parse_attention(text) if weighted else [[text, 1.0]]
    # one lookup, not get_vocab(): that copies the whole 49k-entry vocabulary on every call
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    comma = None if comma is None or comma == tokenizer.unk_token_id else comma
    pattern = None
    if placeholders:
        pattern = "(" + "|".join(_as_word(p) for p in sorted(placeholders, key=len, reverse=True)) + ")"
    chunks: list[Chunk] = []
    cur: list = []  # [(id, weight, placeholder or None)]
    last_comma = -1

    def close():
        nonlocal cur, last_comma
        ids = [tokenizer.bos_token_id] + [t for t, _, _ in cur] + [tokenizer.eos_token_id]
        weights = [1.0] + [w for _, w, _ in cur] + [1.0]
        marks = [(i + 1, p) for i, (_, _, p) in enumerate(cur) if p is not None]
        pad = CHUNK + 2 - len(ids)
        chunks.append(Chunk(ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad, marks, len(ids)))
        cur, last_comma = [], -1

    for piece, weight in parsed:
        if piece == "BREAK" and weight == -1:
            close()
            continue
        tokens = []
        for i, part in enumerate(re.split(pattern, piece) if pattern else [piece]):
            if i % 2 == 1:  # n positions for an n-vector embedding (widths), as diffusers expands it
                tokens += [(tokenizer.unk_token_id, part if k == 0 else (part, k))
                           for k in range((widths or {}).get(part, 1))]
            elif part:
                tokens += [(t, None) for t in tokenizer(part, add_special_tokens=False).input_ids]
        for token, placeholder in tokens:
            if token == comma and placeholder is None:
                last_comma = len(cur)
            elif len(cur) == CHUNK and last_comma != -1 and len(cur) - last_comma <= COMMA_BACKTRACK:
                moved = cur[last_comma + 1:]
                cur = cur[:last_comma + 1]
                close()
                cur = moved
            if len(cur) == CHUNK:
                close()
            cur.append((token, weight, placeholder))
    if cur or not chunks:
        close()
    return chunks


def empty_chunk(tokenizer) -> Chunk:
    return chunk_prompt(tokenizer, "")[0]


def text_positions(tokenizer, prompts: list, tokens: list) -> list:
    """Semantics: per prompt (as `encode_prompts` takes them), Shape [77 * c_i] bool: True at every
    chunk's BOS, tokens and EOS, False at the padding after each chunk's EOS (an added empty chunk:
    its BOS and EOS). Positions line up with `encode_prompts`' rows. (CLIP's unk id, which a
    placeholder's position holds, is its EOS id, so the EOS is found from the chunk's length, not
    its ids.)"""
    out = []
    for (text, n_chunks, _, weighted), tok in zip(prompts, tokens):
        widths = {p: e.shape[0] for p, e in tok.items() if e.dim() == 2}
        chunks = chunk_prompt(tokenizer, text, list(tok), weighted=weighted, widths=widths)[:n_chunks]
        chunks += [empty_chunk(tokenizer)] * (n_chunks - len(chunks))
        out.append(torch.tensor([k < c.length for c in chunks for k in range(len(c.ids))]))
    return out


def encode_prompts(tokenizer, text_encoder, prompts: list, tokens: list, device, *, te_rows=None,
                   te_lora=None, te_files=None, grad: bool = False) -> list:
    """Semantics: the A1111 encoding of each prompt, Shape [77 * c_i, D] each.

    prompts[i] = (text, chunks c_i, clip_skip, weighted): `text` cut into chunks (chunk_prompt),
    truncated or padded with empty chunks to exactly c_i; every chunk encoded on its own through
    the text encoder (clip_skip k > 1: the k-th last hidden state through the final layer norm,
    diffusers' clip_skip = k - 1); when weighted, z = z * w then z * (mean(z_before) / mean(z))
    per chunk; the chunks concatenated. tokens[i]: placeholder -> input embedding, Shape [D_emb]
    (or [n, D_emb]: n consecutive positions).
    te_rows / te_lora / te_files: the text-encoder LoRA rows of each prompt (engine/plan.py),
    applied to every chunk of that prompt. All chunks of all prompts run in ONE encoder call.
    grad: autograd on (training), so gradients reach token embeddings that require them.
    """
    import contextlib

    rows, meta, injections = [], [], []
    for i, ((text, n_chunks, clip_skip, weighted), tok) in enumerate(zip(prompts, tokens)):
        widths = {p: e.shape[0] for p, e in tok.items() if e.dim() == 2}  # multi-vector embeddings
        chunks = chunk_prompt(tokenizer, text, list(tok), weighted=weighted, widths=widths)[:n_chunks]
        chunks += [empty_chunk(tokenizer)] * (n_chunks - len(chunks))
        for c in chunks:
            for pos, p in c.marks:  # p: a placeholder, or (placeholder, k) for its k-th vector
                name, k = (p, 0) if isinstance(p, str) else p
                injections.append((len(rows), pos, tok[name].reshape(-1, tok[name].shape[-1])[k]))
            rows.append(c.ids)
            meta.append((i, clip_skip, weighted, c.weights))
    input_ids = torch.tensor(rows, device=device)
    emb = text_encoder.get_input_embeddings()

    def inject(module, args, output):
        output = output.clone()
        for b, pos, vec in injections:
            output[b, pos] = vec.to(device=output.device, dtype=output.dtype)
        return output

    handle = emb.register_forward_hook(inject) if injections else None
    chunk_te_rows = [te_rows[i] for i, *_ in meta] if te_rows is not None else None
    lora = te_lora.activate(chunk_te_rows, te_files) if te_lora is not None else contextlib.nullcontext()
    try:
        with lora, torch.inference_mode(not grad):
            mask = None
            if getattr(text_encoder.config, "use_attention_mask", False):
                mask = (input_ids != tokenizer.pad_token_id).long()
            skips = {s for _, s, _, _ in meta}
            out = text_encoder(input_ids, attention_mask=mask, output_hidden_states=skips != {1})
            z = out[0]
            if skips != {1}:
                # transformers 5 keeps the layer norm on the model itself (4.x: on .text_model)
                norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
                picked = [out.hidden_states[-s][r] if s > 1 else z[r] for r, (_, s, _, _) in enumerate(meta)]
                z = torch.stack([norm(h) if s > 1 else h for h, (_, s, _, _) in zip(picked, meta)])
            parts = []
            for r, (_, _, weighted, weights) in enumerate(meta):
                zr = z[r]
                if weighted and any(w != 1.0 for w in weights):
                    before = zr.mean()
                    zr = zr * torch.tensor(weights, device=zr.device, dtype=zr.dtype)[:, None]
                    zr = zr * (before / zr.mean())
                parts.append(zr)
    finally:
        if handle is not None:
            handle.remove()
    out_rows = [[] for _ in prompts]
    for (i, *_), zr in zip(meta, parts):
        out_rows[i].append(zr)
    return [torch.cat(r) for r in out_rows]


def count_chunks(tokenizer, text: str, placeholders=(), *, weighted: bool = False) -> int:
    """Chunks the prompt needs (before any cap)."""
    return len(chunk_prompt(tokenizer, text, placeholders, weighted=weighted))
