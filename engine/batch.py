"""The batch state: the one object the worker writes and the UNet's hooks and processors read.

Allocated once for `max_rows` rows, rewritten in place whenever the set of rows changes (a
request joins or leaves), read by every step in between (the vLLM punica-wrapper pattern:
buffers made in `__init__`, filled by `write_layout`, read by the layers):

    embeds  [max_rows, L_max, D]        text encodings (the UNet's encoder_hidden_states)
    kv      attn2 layer -> (K, V), each [max_rows, L_max, inner]: planned K/V, adapters folded in
    lengths [max_rows]                  keys per row; rows shorter than the longest are masked
    lora    runtime key -> (tables, rows): what the LoRA hooks of that runtime apply now

    image   attn2 layer -> (K', V'), each [max_rows, L_img, inner]: image tokens' K/V (decoupled
            cross-attention, encoder family), with image_scale [max_rows] and per-row lengths

L_max = 77 * max_prompt_chunks. Image tokens have their own sequence axis and lengths (a row
without an image has length 0 and scale 0); its buffers are allocated on the first layout with
an image, for `L_img` = the next power of two holding it, at least 16 (grown, never per step). Rows are laid
out per request as [uncond x N, cond x N, style_1 x N, ...] (the guidance blend's layout).
"""

from __future__ import annotations

import torch


MIN_IMAGE_KEYS = 16  # image-key capacity: one IP-Adapter Plus image (16 tokens) or four base ones


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
        self._held_image = None  # ({layer: (K', V')}, scale [rows]) read as given (training: `hold_images`)
        self._image = None  # (capacity L_img, {layer: (K', V')}, scale [max_rows]) once an image is laid out
        self.image_len = 0  # image keys of the current layout (0: no row has an image)
        self.image_mask: torch.Tensor | None = None  # bool [rows, 1, 1, image_len] while image_len > 0

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
        image = 0 if self._image is None else sum(k.nbytes + v.nbytes for k, v in self._image[1].values())
        return embeds.nbytes + sum(k.nbytes + v.nbytes for k, v in kv.values()) + image

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
        self._held = self._held_image = None
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
        self.image_len, self.image_mask = 0, None  # until write_images says otherwise
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
        self._held, self._held_image = (embeds, kv), None
        self.rows, self.seq_len, self.key_mask, self.owner = embeds.shape[0], embeds.shape[1], None, None
        self.image_len, self.image_mask = 0, None  # no image branch unless hold_images gives one

    def hold_images(self, kv: dict, scale: torch.Tensor) -> None:
        """Training (after `hold`): the next forwards' image branch reads `kv` {layer: (K', V')
        [rows, L_img, h]} and `scale` [rows] themselves, so gradients flow back to them; every row
        has all L_img keys (no mask). `hold`, `release` and `write_layout` end it."""
        self._held_image = (kv, scale)
        self.image_len, self.image_mask = next(iter(kv.values()))[0].shape[1], None

    def release(self) -> None:
        """End `hold`: the buffers are read again once the next layout is written."""
        self._held = self._held_image = None
        self.rows, self.owner = 0, None
        self.image_len, self.image_mask = 0, None

    def write_images(self, rows: list) -> None:
        """Copy each row's image tokens' K'/V' into the image buffers (after `write_layout`).

        Semantics: rows[r] = None (no image: length 0, scale 0) or an ImageKV (scale, {layer:
        (K' [L_r, h], V')}), for the rows of the layout in order. After this, image_len =
        the buffer's capacity (>= max L_r; a fixed shape for compiled steps), row r holds its K'/V'
        in [0, L_r) and zeros after, image_scale[r] its scale, and image_mask [rows, 1, 1,
        image_len] marks each row's real keys.
        """
        if len(rows) != self.rows:
            raise ValueError(f"{len(rows)} image rows for a layout of {self.rows} rows")
        lengths = [0 if x is None else next(iter(x.kv.values()))[0].shape[0] for x in rows]
        n = len(rows)
        longest = max(lengths, default=0)
        self.image_len = 0
        if longest == 0:
            self.image_mask = None
            return
        if self._image is None or self._image[0] < longest:
            cap = max(MIN_IMAGE_KEYS, 1 << (longest - 1).bit_length())
            new = lambda h: torch.zeros(self.max_rows, cap, h, device=self.device, dtype=self.dtype)  # noqa: E731
            self._image = (cap, {name: (new(a.to_k.out_features), new(a.to_v.out_features))
                                 for name, a in self.attn2.items()},
                           torch.zeros(self.max_rows, device=self.device, dtype=self.dtype))
        cap, kv, scale = self._image
        # the step reads all `cap` keys, masked: a compiled UNet sees one shape for every layout
        self.image_len = cap
        for name, (K, V) in kv.items():
            K[:n, : self.image_len].zero_()
            V[:n, : self.image_len].zero_()
            for r, x in enumerate(rows):
                if x is not None:
                    k, v = x.kv[name]
                    K[r, : k.shape[0]].copy_(k)
                    V[r, : v.shape[0]].copy_(v)
        scale[:n].copy_(torch.tensor([0.0 if x is None else float(x.scale) for x in rows]))
        # always a mask (one graph for a compiled step); a row without an image attends to one
        # zero key (output 0, times scale 0): never a softmax over no key, never a NaN
        per_row = torch.tensor([max(n_, 1) for n_ in lengths], device=self.device)
        self.image_mask = (torch.arange(self.image_len, device=self.device)[None, :] < per_row[:, None])[:, None, None, :]

    def planned_image(self, layer: str):
        """(K', V') each Shape [rows, image_len, inner], the key mask and the per-row scale
        Shape [rows, 1, 1], for one attn2 layer while a step runs and some row has an image;
        None otherwise (the layer then has no image branch)."""
        if not self.planned or self.image_len == 0:
            return None
        if self._held_image is not None:
            kv, scale = self._held_image
            K, V = kv[layer]
            return K, V, None, scale[:, None, None]
        _, kv, scale = self._image
        K, V = kv[layer]
        n, L = self.rows, self.image_len
        return K[:n, :L], V[:n, :L], self.image_mask, scale[:n, None, None]

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
