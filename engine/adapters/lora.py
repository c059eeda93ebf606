"""Per-row LoRA on the frozen base UNet: fixed slot pools and forward hooks.

An adapter is never merged into the base weights. Each LoRA-carrying UNet module gets a forward
hook (installed once, when the first registered adapter targets it) that adds, row by row,

    y[r] += sum_m scales[r, m] * (x[r] @ A_pool[slots[r, m]]) @ B_pool[slots[r, m]]

through `impasto.kernels.lora_apply`, one call per rank bucket. Pools are per module and rank
bucket: A_pool [S, K, R], B_pool [S, R, N], zero-padded to R. A slot holds one adapter in every
module of its bucket (zeros where the adapter has no layer). The file's per-layer scale
(alpha / r, rsLoRA, alpha_pattern) is folded into B when the adapter is copied in, so the row
table carries only the user's weight — as PEFT's `set_adapters(names, adapter_weights)` does.

Two modes:
  * lazy (default): rank buckets 4, 8, ..., up to max_rank; a (module, bucket) pool is allocated
    the first time an adapter needs it and never re-allocated; row tables are packed to the
    widest row (the CPU reference computes every column, used or not).
  * fixed (`fixed_targets=`, for torch.compile and CUDA graphs): one bucket padded to max_rank,
    pools and hooks for exactly the given modules allocated at construction, and persistent
    full-width [rows, M] tables written in place. Swapping adapters of any rank changes tensor
    contents only, never shapes or objects, so a compiled UNet does not recompile.
With `pool_bytes`, the slots per bucket are what the budget holds when every bucket of every
target module is allocated (`slots_for_budget`), so lazy allocation never exceeds it.

Running example: S = 4 slots per bucket, rank-8 adapter "a" and rank-16 adapter "b". "a" lives
in bucket 8 slot 0, "b" in bucket 16 slot 0; a row that names ("a", 0.5) and "b" has
slots_8 = [0, -1, ...], scales_8 = [0.5, 0, ...] and slots_16 = [-1, 0, ...], scales_16 = [0, 1, ...].
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from impasto.kernels import lora_apply, lora_delta, lora_meta

from ..errors import AdapterError, AdapterShapeError, AdapterValueError
from .lora_variants import VARIANTS, variant_delta, variant_tables

RANK_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512)


def rank_bucket(rank: int) -> int:
    for b in RANK_BUCKETS:
        if rank <= b:
            return b
    raise AdapterValueError(f"rank {rank} is above the largest bucket {RANK_BUCKETS[-1]}")


def runtime_buckets(max_rank: int, fixed: bool) -> tuple[int, ...]:
    """A runtime's rank buckets: fixed mode one of max_rank; lazy mode every bucket up to the
    one holding max_rank."""
    if fixed:
        return (max_rank,)
    top = rank_bucket(max_rank)
    return tuple(b for b in RANK_BUCKETS if b <= top)


def slots_for_budget(pool_bytes: int, targets: list[dict], buckets, dtype) -> int:
    """Slots per bucket that fit `pool_bytes` when every bucket of every target is allocated.

    Semantics: one slot of bucket R in a module K -> N holds A [K, R] and B [R, N]:
    (K + N) * R elements. S = pool_bytes // (sum over targets and buckets of those bytes).
    """
    per_slot = sum(k + n for t in targets for k, n in t.values()) * sum(buckets) * dtype.itemsize
    slots = int(pool_bytes) // max(per_slot, 1)
    if slots < 1:
        raise ValueError(
            f"device_pool_bytes={pool_bytes} holds no LoRA slot: one slot in each rank bucket {tuple(buckets)} "
            f"of the {sum(len(t) for t in targets)} target modules takes {per_slot} bytes"
        )
    return slots


def _dead():
    return None


ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def attention_targets(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """The attention projections (to_q, to_k, to_v, to_out.0): what diffusers' and PEFT's SD
    LoRA recipes target, and the fixed mode's default."""
    ends = tuple("." + p for p in ATTENTION_PROJECTIONS)
    return {name: kn for name, kn in lora_targets(unet).items() if name.endswith(ends)}


def lora_targets(unet: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Modules a LoRA may target: every Linear and every 1×1 Conv2d, by name -> (in, out)."""
    out = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear):
            out[name] = (m.in_features, m.out_features)
        elif isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1:
            out[name] = (m.in_channels, m.out_channels)
    return out


def validate_lora_header(header, targets: dict, max_rank: int, all_targets: dict | None = None) -> None:
    """Check a LoRA file header against the base model; raise naming the file and module.

    targets: the modules this engine serves; all_targets: every Linear / 1x1 conv of the base
    (when the engine serves a subset, a module in all_targets but not targets gets its own message).
    """
    path = header.path
    if not header.layers and not header.text_encoder_keys and not getattr(header, "variants", None):
        raise AdapterShapeError(f"{path}: no LoRA layers found")
    for module, info in header.layers.items():
        if module not in targets:
            if all_targets is not None and module in all_targets:
                raise AdapterShapeError(
                    f"{path}: module {module!r} is not served by this engine's fixed LoRA pools "
                    f"(compile mode serves the attention projections {', '.join(ATTENTION_PROJECTIONS)})"
                )
            raise AdapterShapeError(f"{path}: module {module!r} is not a Linear or 1x1 conv of this base UNet")
        k, n = targets[module]
        if (info.in_features, info.out_features) != (k, n):
            raise AdapterShapeError(
                f"{path}: module {module!r} is {k}->{n} in this base model, the adapter has "
                f"{info.in_features}->{info.out_features} (made for another base model?)"
            )
        if info.rank > max_rank:
            raise AdapterValueError(f"{path}: module {module!r} has rank {info.rank}, above max_rank={max_rank}")


@dataclass
class _Table:
    """One rank bucket's row table for the active group: fixed for all steps of the group."""

    slots: torch.Tensor  # int32 [rows, M]
    scales: torch.Tensor  # float32 [rows, M]
    meta: object  # LoraMeta, shared by every module


class _TableHolder:
    """Where the hooks of a runtime built outside an engine find their tables."""

    def __init__(self):
        self.lora: dict = {}


class LoraRuntime:
    """Slot pools + hooks applying, per row, the LoRA adapters that row names."""

    def __init__(self, unet, *, slots_per_bucket: int, max_adapters_per_row: int, device, dtype,
                 max_rank: int = RANK_BUCKETS[-1], fixed_targets: dict | None = None,
                 state=None, key: str = "unet"):
        """fixed_targets: None for the lazy mode, else {module: (in, out)} for the fixed mode.
        state, key: the hooks read their tables from `state.lora[key]` (the engine's BatchState;
        a private holder when None), written by `activate`/`set_tables`."""
        self.unet = unet
        self.S = slots_per_bucket
        self.M = max_adapters_per_row
        self.device, self.dtype = torch.device(device), dtype
        self.max_rank = max_rank
        self.fixed = fixed_targets is not None
        self.buckets = runtime_buckets(max_rank, self.fixed)
        self.modules = dict(unet.named_modules())
        self.pools: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # module -> bucket -> (A, B)
        self.resident: dict[int, OrderedDict] = {}  # bucket -> name -> slot, LRU order
        self.adapter_bucket: dict[str, int] = {}
        self.loaded_version: dict[str, weakref.ref] = {}  # name -> weak ref to the LoraFile in its slot
        self._hooked: dict[str, object] = {}  # module -> hook handle
        self._written: dict[tuple[int, int], set[str]] = {}  # (bucket, slot) -> modules holding its adapter
        self.state = state if state is not None else _TableHolder()
        self.key = key
        self.state.lora[key] = None
        self.pins: dict[str, int] = {}  # adapters the requests in flight keep in their slots
        self._fixed_tables: dict[int, dict[int, _Table]] = {}  # rows -> {bucket: table}, fixed mode
        for module in fixed_targets or ():
            self._pool(module, max_rank)

    def bucket(self, rank: int) -> int:
        if rank > self.max_rank:
            raise AdapterValueError(f"rank {rank} is above max_rank={self.max_rank}")
        return self.max_rank if self.fixed else rank_bucket(rank)

    # ------------------------------------------------------------------ slots
    def _hook_module(self, name: str) -> None:
        if name in self._hooked:
            return
        module = self.modules[name]
        self._hooked[name] = module.register_forward_hook(self._make_hook(name))

    def _pool(self, module: str, bucket: int):
        pools = self.pools.setdefault(module, {})
        if bucket not in pools:
            m = self.modules[module]
            k, n = (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else (m.in_channels, m.out_channels)
            pools[bucket] = (
                torch.zeros(self.S, k, bucket, device=self.device, dtype=self.dtype),
                torch.zeros(self.S, bucket, n, device=self.device, dtype=self.dtype),
            )
            self._hook_module(module)
        return pools[bucket]

    def _free_slot(self, bucket: int, pinned: set[str]) -> int:
        res = self.resident.setdefault(bucket, OrderedDict())
        used = set(res.values())
        for s in range(self.S):
            if s not in used:
                return s
        for name, s in res.items():  # least recently used first
            if name not in pinned and not self.pins.get(name):
                del res[name]
                self.adapter_bucket.pop(name, None)
                self.loaded_version.pop(name, None)
                return s
        raise AdapterError(f"all {self.S} slots of rank bucket {bucket} are in use by this batch")

    def nbytes(self) -> int:
        """Bytes held by the slot pools (allocated once per module and rank bucket)."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for pools in self.pools.values() for a, b in pools.values())

    def evict(self, name: str) -> None:
        """Forget a resident adapter (its slot is reused later; no memory is freed)."""
        bucket = self.adapter_bucket.pop(name, None)
        self.loaded_version.pop(name, None)
        if bucket is not None:
            self.resident[bucket].pop(name, None)

    def load(self, name: str, lora, pinned: set[str]) -> None:
        """Copy adapter `name` (a LoraFile) into a slot of its bucket, in place, unless resident."""
        where = f"{getattr(lora, 'path', '?')}: adapter {name!r}"
        variants = getattr(lora, "variants", None) or {}
        for module in variants:  # LoCon / LoHa / LoKr / DoRA: no slot, their own path of the hook
            if self.fixed:
                raise AdapterShapeError(f"{where}: {variants[module].kind} layer on {module!r}: the fixed LoRA pools "
                                        "serve only low-rank linear pairs")
            self._hook_module(module)
        if not lora.layers and variants:
            return
        if not lora.layers:
            raise AdapterError(f"{where} has no layers for this model")
        rank = max(layer.rank for layer in lora.layers.values())
        if rank > self.max_rank:
            raise AdapterValueError(f"{where} has rank {rank}, above max_rank={self.max_rank}")
        bucket = self.bucket(rank)
        if self.fixed and not set(lora.layers) <= set(self.pools):
            extra = sorted(set(lora.layers) - set(self.pools))
            raise AdapterShapeError(f"{where} targets {extra[0]!r}, which the fixed LoRA pools do not hold")
        for module, layer in lora.layers.items():
            m = self.modules.get(module)
            kn = (m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else (
                (m.in_channels, m.out_channels) if isinstance(m, torch.nn.Conv2d) else None)
            if kn is None or tuple(layer.down.shape) != (layer.rank, kn[0]) or tuple(layer.up.shape) != (kn[1], layer.rank):
                raise AdapterShapeError(f"{where}: module {module!r} is {kn} in this base, the adapter has down "
                                        f"{list(layer.down.shape)}, up {list(layer.up.shape)}")
        res = self.resident.setdefault(bucket, OrderedDict())
        if name in res and self.loaded_version.get(name, _dead)() is lora:
            res.move_to_end(name)
            return
        self.evict(name)
        slot = self._free_slot(bucket, pinned)
        # Pools start zeroed; clear only what the slot's previous adapter wrote and this one won't.
        # Until the copy completes, the slot counts as written in every module either adapter
        # has: a copy that fails part-way leaves a dirty slot that the next load clears.
        before = self._written.get((bucket, slot), set())
        self._written[(bucket, slot)] = before | set(lora.layers)
        for module in before - set(lora.layers):
            if bucket not in self.pools.get(module, {}):
                continue  # a copy that failed before this module's pool existed
            A, B = self.pools[module][bucket]
            A[slot].zero_()
            B[slot].zero_()
        for module, layer in lora.layers.items():
            A, B = self._pool(module, bucket)
            r = layer.rank
            A[slot, :, :r].copy_(layer.down.t())
            A[slot, :, r:].zero_()
            B[slot, :r, :].copy_(layer.up.t() * layer.scale)
            B[slot, r:, :].zero_()
        self._written[(bucket, slot)] = set(lora.layers)  # clean: complete copy of this adapter
        res[name] = slot
        self.adapter_bucket[name] = bucket
        # a weak reference: the slot never keeps an evicted host-cache file alive
        self.loaded_version[name] = weakref.ref(lora)

    # ------------------------------------------------------------------ activation
    def pin(self, names) -> None:
        """Keep `names` in their slots until `unpin` (a request in flight uses them)."""
        for n in names:
            self.pins[n] = self.pins.get(n, 0) + 1

    def unpin(self, names) -> None:
        for n in names:
            self.pins[n] -= 1
            if not self.pins[n]:
                del self.pins[n]

    def free_slots(self, bucket: int) -> int:
        """Slots of `bucket` not held by a pinned adapter."""
        res = self.resident.get(bucket, {})
        return self.S - sum(1 for n in res if self.pins.get(n))

    def tables(self, row_adapters: list[list[tuple[str, float]]], files: dict):
        """Load every adapter named into a slot and build the row tables for `row_adapters`.

        files: name -> LoraFile for every adapter named. Returns one slot table and one kernel
        metadata per rank bucket (reused by every module and every step), or None when no row
        names an adapter (lazy mode).
        """
        variant_rows = [[(n, w) for n, w in row if getattr(files[n], "variants", None)] for row in row_adapters]
        for name in sorted({n for row in variant_rows for n, _ in row}):
            self.load(name, files[name], pinned=set())  # hooks their modules (they hold no slot)
        variants = variant_tables(self.modules, variant_rows, files, self.device) if any(variant_rows) else None
        # adapters with no layers in this model (a text-encoder-only LoRA seen by the UNet) skip
        row_adapters = [[(n, w) for n, w in row if files[n].layers] for row in row_adapters]
        names = {n for row in row_adapters for n, _ in row}
        if not names and not self.fixed:
            return {VARIANTS: variants} if variants else None
        for name in sorted(names):
            self.load(name, files[name], pinned=names)
        tables = self._fixed_table(row_adapters) if self.fixed else self._packed_tables(row_adapters, names)
        return {**tables, VARIANTS: variants} if variants else tables

    def set_tables(self, tables, rows: int) -> None:
        """What the hooks apply from now on: `tables` for a batch of `rows` rows (None: nothing)."""
        self.state.lora[self.key] = None if tables is None else (tables, rows)

    @contextlib.contextmanager
    def activate(self, row_adapters: list[list[tuple[str, float]]], files: dict):
        """Make row r apply the (name, scale) pairs row_adapters[r] during the block (then
        restore what was active before)."""
        before = self.state.lora.get(self.key)
        self.set_tables(self.tables(row_adapters, files), len(row_adapters))
        try:
            yield
        finally:
            self.state.lora[self.key] = before

    def close(self) -> None:
        """Remove every hook; the module then computes exactly its base output."""
        for handle in self._hooked.values():
            handle.remove()
        self._hooked.clear()
        self.state.lora[self.key] = None

    def _fixed_table(self, row_adapters) -> dict[int, _Table]:
        """Fixed mode: the persistent [rows, M] table for this row count, rewritten in place."""
        rows = len(row_adapters)
        if rows not in self._fixed_tables:
            slots = torch.full((rows, self.M), -1, dtype=torch.int32, device=self.device)
            scales = torch.zeros((rows, self.M), dtype=torch.float32, device=self.device)
            self._fixed_tables[rows] = {self.max_rank: _Table(slots, scales, lora_meta(slots, self.S))}
        (table,) = self._fixed_tables[rows].values()
        slots = torch.full((rows, self.M), -1, dtype=torch.int32)
        scales = torch.zeros((rows, self.M), dtype=torch.float32)
        for r, row in enumerate(row_adapters):
            for m, (n, w) in enumerate(row):
                slots[r, m] = self.resident[self.max_rank][n]
                scales[r, m] = w
        table.slots.copy_(slots)
        table.scales.copy_(scales)
        lora_meta(table.slots, self.S, out=table.meta)
        return self._fixed_tables[rows]

    def _packed_tables(self, row_adapters, names) -> dict[int, _Table]:
        """Lazy mode: one table per bucket in use, each row's pairs packed to the left."""
        rows = len(row_adapters)
        tables: dict[int, _Table] = {}
        for bucket in {self.adapter_bucket[n] for n in names}:
            # Each row's pairs of this bucket are packed to the left and the table is cut to the
            # widest row: the reference path computes every column, used or not.
            pairs = [[(self.resident[bucket][n], w) for n, w in row if self.adapter_bucket[n] == bucket]
                     for row in row_adapters]
            width = max(len(p) for p in pairs)
            slots = torch.full((rows, width), -1, dtype=torch.int32)
            scales = torch.zeros((rows, width), dtype=torch.float32)
            for r, row in enumerate(pairs):
                for m, (slot, scale) in enumerate(row):
                    slots[r, m] = slot
                    scales[r, m] = scale
            slots, scales = slots.to(self.device), scales.to(self.device)
            tables[bucket] = _Table(slots, scales, lora_meta(slots, self.S))
        return tables

    def _make_hook(self, name: str):
        def hook(module, args, output):
            active = self.state.lora.get(self.key)
            if active is None:
                return None
            tables, rows = active
            pools = self.pools.get(name, {})
            uses = (tables.get(VARIANTS) or {}).get(name)
            if uses:  # from the base output, before the pool path adds to it in place
                output = output + variant_delta(module, args[0], output, uses)
            for bucket, table in tables.items():
                if bucket in pools:
                    output = self._apply(module, args[0], output, *pools[bucket], table, rows)
            return output

        return hook

    def _apply(self, module, x, y, A, B, table: _Table, rows: int):
        if x.shape[0] != rows:
            raise RuntimeError(f"LoRA hook: module input has batch {x.shape[0]}, the row table has {rows} rows")
        grad = torch.is_grad_enabled() and (x.requires_grad or A.requires_grad or B.requires_grad)
        if isinstance(module, torch.nn.Conv2d):  # 1x1 conv = linear over channels
            b, k, h, w = x.shape
            x3 = x.permute(0, 2, 3, 1).reshape(b, h * w, k)
            d = lora_delta(x3, A, B, table.slots, table.scales, meta=table.meta)
            return y + d.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        x3 = x.reshape(rows, -1, x.shape[-1])
        if grad or y.requires_grad:
            d = lora_delta(x3, A, B, table.slots, table.scales, meta=table.meta)
            return y + d.reshape(y.shape)
        lora_apply(y.view(rows, -1, y.shape[-1]), x3, A, B, table.slots, table.scales, meta=table.meta)
        return y
