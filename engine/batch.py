"""The batch state: the one object the worker writes and the UNet's hooks and processors read.

Allocated once for `max_rows` rows, rewritten in place whenever the set of rows changes (a
request joins or leaves), read by every step in between (the vLLM punica-wrapper pattern:
buffers made in `__init__`, filled by `write_layout`, read by the layers):

    embeds  [max_rows, L_max, D]        text encodings (the UNet's encoder_hidden_states)
    kv      attn2 layer -> (K, V), each [max_rows, L_max, inner]: planned K/V, adapters folded in
    lengths [max_rows]                  keys per row; rows shorter than the longest are masked
    lora    runtime key -> (tables, rows): what the LoRA hooks of that runtime apply now

L_max = 77 * max_prompt_chunks (+ image tokens, later). Rows are laid out per request as
[uncond x N, cond x N, style_1 x N, ...] (the guidance blend's layout).
"""

from __future__ import annotations

import torch


class BatchState:
    """Row layout, planned K/V and LoRA tables of the forward that runs next."""

    def __init__(self, attn2: dict, *, max_rows: int, max_len: int, embed_dim: int, device, dtype):
        self.max_rows, self.max_len = max_rows, max_len
        self.device, self.dtype = torch.device(device), dtype
        self.attn2 = attn2
        self._embed_dim = embed_dim
        self._buffers = None  # allocated on the first layout: an engine that never serves holds none
        self.rows = 0
        self.seq_len = 0
        self.key_mask: torch.Tensor | None = None  # bool [rows, 1, 1, seq_len], None when no row is padded
        self.planned = False  # True while a step forward runs: attn2 reads `kv`
        self.lora: dict[str, tuple[dict, int] | None] = {}
        self.owner = None  # identity of the layout written (engine-defined), to skip rewrites
        self._held = None  # (embeds, kv) read as given instead of the buffers (training: `hold`)

    def _alloc(self):
        if self._buffers is None:
            R, L = self.max_rows, self.max_len
            new = lambda h: torch.zeros(R, L, h, device=self.device, dtype=self.dtype)  # noqa: E731
            self._buffers = (
                new(self._embed_dim),
                {name: (new(a.to_k.out_features), new(a.to_v.out_features)) for name, a in self.attn2.items()},
            )
        return self._buffers

    def nbytes(self) -> int:
        if self._buffers is None:
            return 0
        embeds, kv = self._buffers
        return embeds.nbytes + sum(k.nbytes + v.nbytes for k, v in kv.values())

    def write_layout(self, parts: list) -> None:
        """Copy each part's rows into the buffers, one after another.

        Semantics: parts[i] = (embeds [n_i, L_i, D], {layer: (K [n_i, L_i, h], V)}); rows
        sum(n_i) <= max_rows, L_i <= max_len. After this, rows [r_i, r_i + n_i) hold part i,
        padded to seq_len = max L_i, and key_mask marks each row's real keys (None if none is padded).
        """
        rows = sum(e.shape[0] for e, _ in parts)
        if rows > self.max_rows:
            raise ValueError(f"batch of {rows} rows exceeds max_batch_rows={self.max_rows}")
        lengths = [e.shape[1] for e, _ in parts]
        if max(lengths) > self.max_len:
            raise ValueError(f"a row has {max(lengths)} keys, the batch state holds {self.max_len}")
        self._held = None
        embeds, kv = self._alloc()
        r = 0
        for (e, layers), n_keys in zip(parts, lengths):
            n = e.shape[0]
            embeds[r:r + n, :n_keys].copy_(e)
            for name, (k, v) in layers.items():
                K, V = kv[name]
                K[r:r + n, :n_keys].copy_(k)
                V[r:r + n, :n_keys].copy_(v)
            r += n
        self.rows, self.seq_len = rows, max(lengths)
        if min(lengths) == self.seq_len:
            self.key_mask = None
        else:
            per_row = torch.tensor([n for (e, _), n in zip(parts, lengths) for _ in range(e.shape[0])],
                                   device=self.device)
            self.key_mask = (torch.arange(self.seq_len, device=self.device)[None, :] < per_row[:, None])[:, None, None, :]

    def hold(self, embeds: torch.Tensor, kv: dict) -> None:
        """Training: the next forwards read `embeds` [rows, L, D] and `kv` {layer: (K, V) [rows, L, h]}
        themselves, not copies in the buffers, so gradients flow back to them; every row has all
        L keys (no mask). `write_layout` ends it."""
        self._held = (embeds, kv)
        self.rows, self.seq_len, self.key_mask, self.owner = embeds.shape[0], embeds.shape[1], None, None

    def release(self) -> None:
        """End `hold`: the buffers are read again once the next layout is written."""
        self._held = None
        self.rows, self.owner = 0, None

    @property
    def embeds(self) -> torch.Tensor:
        """Shape [rows, seq_len, D]: the current rows' text encodings."""
        if self._held is not None:
            return self._held[0]
        return self._alloc()[0][: self.rows, : self.seq_len]

    def planned_kv(self, layer: str):
        """(K, V), each Shape [rows, seq_len, inner], and the key mask, for one attn2 layer while
        a step runs; None otherwise (attn2 then computes its own K/V, as diffusers does)."""
        if not self.planned:
            return None
        if self._held is not None:
            return (*self._held[1][layer], None)
        K, V = self._alloc()[1][layer]
        return K[: self.rows, : self.seq_len], V[: self.rows, : self.seq_len], self.key_mask
