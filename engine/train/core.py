"""The one training loop of impasto.train, and the forward it runs through the engine.

Every method (Custom Diffusion here; Perfusion, Pair Customization and the encoder adapter
later) is a `Method`: what is trainable, which in-memory adapters the conditioning plan folds in
for each row, how it adjusts the planned K/V, what it does after backward, and how it writes its
result. The loop does the rest, the same for all:

    for step in [start, steps):
        batch   = examples drawn with the run's numpy RNG (augmented, masked), class rows after
        latents = vae.encode(pixels).latent_dist.sample(gen) * scaling_factor
        noise ~ N(0, I) (gen); t ~ U{0 .. num_train_timesteps - 1} (gen)
        x_t     = DDPM forward process of the base's own scheduler config (add_noise)
        pred    = UNet(x_t, t) through the engine: build_plan(grad=True) -> BatchState.hold ->
                  PlannedCrossAttnProcessor on every attn2, LoRA hooks and impasto.kernels ops
        target  = noise (epsilon) or velocity (v_prediction), as the config says
        loss    = mean_b Σ(mask·(pred - target)²)/Σmask over instance rows + w_prior·mse(class rows)
                  (method.loss; Perfusion's is ChenDarYen's, after method.before_loss updated i*)
        backward; method.after_backward(); clip_grad_norm(max_grad_norm); AdamW step; method.after_step()
    (accumulate = k > 1: k such batches, each drawn, before_loss'd and backpropagated at loss / k in
    turn, before the one optimizer step: Lightning's accumulate_grad_batches, as ChenDarYen's
    Perfusion config trains, with its per-micro-batch EMA of i*)

Reproducible: one torch.Generator (latents, noise, timesteps) and one numpy Generator
(sampling, augmentation) seeded from `seed`; a checkpoint (every `checkpoint_every` steps, in
`output/checkpoint-<step>/`) holds the trained tensors, the AdamW state, both RNG states and the
losses, so `resume=True` continues bit for bit. Checkpoints are read with weights_only=True.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..adapters.families import Use
from ..plan import Branch, build_plan
from .data import TrainInputError, augment, to_tensor

CHECKPOINT = "checkpoint-{step}"
STATE_FILE = "state.pt"


@dataclass
class Example:
    """One training image: its pixels (size x size), optional mask and prompt; `prior` rows are
    the class images of prior preservation (no augmentation, mask 1)."""

    image: object  # PIL, already square at the training resolution
    prompt: str
    mask: np.ndarray | None = None
    prior: bool = False


@dataclass
class TrainResult:
    path: str  # the output folder
    losses: list = field(default_factory=list)  # loss of every step, in order
    seconds: float = 0.0  # wall time of the steps run by this call
    files: dict = field(default_factory=dict)  # what the method wrote: role -> path
    nbytes: int = 0  # bytes of the written files
    steps: int = 0


class Method:
    """What one training method decides; the loop (`train`) does everything else."""

    name = "method"
    aug = True  # Custom Diffusion's rescale augmentation on instance rows

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained tensors by name, fp32 master weights, created in `__init__`."""
        raise NotImplementedError

    def uses(self) -> list[Use]:
        """The in-memory adapters every row's conditioning plan folds in (their tensors are
        differentiable functions of `parameters()`, rebuilt each step)."""
        return []

    def adjust_kv(self, layer: str, k: torch.Tensor, v: torch.Tensor):
        """Change one attn2 layer's planned K, V [rows, L, h] before the UNet reads them."""
        return k, v

    def after_backward(self) -> None:
        """Gradient surgery between backward and the optimizer step."""

    def after_step(self) -> None:
        """Called after each optimizer step (e.g. to project a parameter back into a set)."""

    def param_groups(self, params: dict, lr: float) -> list[dict]:
        """AdamW's parameter groups (per-group learning rates); default: one group at `lr`."""
        return [{"params": list(params.values())}]

    def buffers(self) -> dict[str, torch.Tensor]:
        """State updated without gradient (e.g. Perfusion's EMA of i*), checkpointed with the
        parameters so a resumed run continues bit for bit."""
        return {}

    def before_loss(self, engine, batch: "Batch") -> None:
        """No-gradient state updates from this step's batch, before its forward."""

    def loss(self, pred, target, batch: "Batch", prior_weight: float) -> torch.Tensor:
        """The loss of one batch's prediction; default: `masked_loss` (Custom Diffusion's)."""
        return masked_loss(pred, target, batch.mask, batch.n_instance, prior_weight)

    def hooks(self, engine):
        """Context manager installed around the UNet forward (trainable step-variant weights)."""
        import contextlib

        return contextlib.nullcontext()

    def write(self, engine, output: str) -> dict:
        """Write the result into `output`; returns role -> path."""
        raise NotImplementedError


class _TrainingStore:
    """The engine's store, plus the method's in-memory adapters (what build_plan asks of a store)."""

    def __init__(self, store, uses: list[Use]):
        self._store, self._uses = store, {u.name: u for u in uses}

    def family(self, name):
        return self._uses[name].family if name in self._uses else self._store.family(name)

    def info(self, name):
        return self._uses[name].info if name in self._uses else self._store.info(name)

    def lora_rows(self, adapters, files):
        return [e for n, s, _ in adapters for e in self.family(n).lora_rows(n, s, files[n])]

    def __getattr__(self, name):
        return getattr(self._store, name)


def engine_forward(engine, method: Method, texts: list[str], x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Semantics: the UNet's prediction for row r = UNet(x_t[r], t[r]; text texts[r] with the
    method's adapters), computed as `generate` computes a step — the conditioning plan
    (engine/plan.py) with autograd on, the planned K/V held by the engine's BatchState and read by
    every attn2's PlannedCrossAttnProcessor — so gradients reach `method.parameters()`.

    texts: R strings; x_t: Shape [R, C, h, w]; t: Shape [R]. Returns Shape [R, C, h, w].
    Takes the engine's step-boundary lock: no serving step runs in between.
    """
    uses = method.uses()
    adapters = tuple((u.name, float(u.scale), tuple(sorted(u.options.items()))) for u in uses)
    files = {u.name: u.file for u in uses}
    with engine._worker.boundary:
        # the last serving layout's LoRA tables must not apply to the training rows; the worker
        # builds its layout again at its next step (owner None)
        engine.lora.set_tables(None, 0)
        engine.state.owner = None
        plan = build_plan([Branch(text, adapters) for text in texts], engine.base, engine.attn2, engine.lora,
                          _TrainingStore(engine.adapters, uses), files, engine.device, engine.dtype,
                          engine.te_lora, grad=True)
        rows = torch.tensor(plan.index, device=engine.device)
        embeds = plan.embeds[rows]
        kv = {name: method.adjust_kv(name, k[rows], v[rows]) for name, (k, v) in plan.kv.items()}
        state = engine.state
        state.hold(embeds, kv)
        state.planned = True
        try:
            with method.hooks(engine):
                return engine.base.unet(x_t.to(engine.dtype), t, encoder_hidden_states=embeds,
                                        return_dict=False)[0]
        finally:
            state.planned = False
            state.release()


@dataclass
class Batch:
    """One step's inputs, everything random already drawn (what the gradient test replays)."""

    texts: list[str]
    latents: torch.Tensor  # [R, C, h, w], instance rows first, then class rows
    noise: torch.Tensor
    timesteps: torch.Tensor  # [R] int64
    mask: torch.Tensor  # [n_instance, 1, h, w]
    n_instance: int


class Trainer:
    """The loop's state: engine, method, data, noise scheduler, RNGs, optimizer."""

    def __init__(self, engine, method: Method, examples: list[Example], *, steps: int, lr: float,
                 batch_size: int, prior_weight: float = 1.0, seed: int = 0, max_grad_norm: float = 1.0,
                 weight_decay: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8, hflip: bool = False,
                 aug: bool | None = None, accumulate: int = 1):
        _check_int("steps", steps, 1, 1_000_000)
        _check_int("batch_size", batch_size, 1, 1024)
        _check_int("accumulate", accumulate, 1, 1024)
        for name, v in (("lr", lr), ("prior_weight", prior_weight), ("max_grad_norm", max_grad_norm),
                        ("weight_decay", weight_decay)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
                raise TrainInputError(f"{name}: expected a finite number >= 0, got {v!r}")
        self.engine, self.method = engine, method
        self.instance = [e for e in examples if not e.prior]
        self.prior = [e for e in examples if e.prior]
        if not self.instance:
            raise TrainInputError("images: no instance image to train on")
        self.steps, self.batch_size, self.prior_weight = steps, batch_size, float(prior_weight)
        self.accumulate = accumulate  # micro-batches per optimizer step
        self.max_grad_norm, self.hflip = float(max_grad_norm), hflip
        self.aug = method.aug if aug is None else aug
        base = engine.base
        self.noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        self.size = base.unet.config.sample_size * base.vae_scale_factor
        self.factor = base.vae_scale_factor
        self.params = method.parameters()
        self.optimizer = torch.optim.AdamW(method.param_groups(self.params, lr), lr=lr, betas=tuple(betas), eps=eps,
                                           weight_decay=weight_decay)
        self.gen = torch.Generator("cpu").manual_seed(seed)
        self.rng = np.random.default_rng(seed)
        self.step = 0
        self.losses: list[float] = []

    # ------------------------------------------------------------------ one step
    def make_batch(self) -> Batch:
        """Draw one step's examples, augmentation, latents, noise and timesteps."""
        idx = self.rng.integers(len(self.instance), size=self.batch_size)
        pixels, masks, texts = [], [], []
        for i in idx:
            ex = self.instance[int(i)]
            p, m, text = augment(ex.image, ex.mask, ex.prompt, self.rng, size=self.size, factor=self.factor,
                                 aug=self.aug, hflip=self.hflip)
            pixels.append(p), masks.append(m), texts.append(text)
        if self.prior:
            for i in self.rng.integers(len(self.prior), size=self.batch_size):
                ex = self.prior[int(i)]
                pixels.append(to_tensor(ex.image))
                texts.append(ex.prompt)
        latents, noise, t = self.draw(torch.stack(pixels))
        mask = torch.stack(masks)[:, None].to(latents.device)
        return Batch(texts, latents, noise, t, mask, len(idx))

    def draw(self, pixels: torch.Tensor, rows: int | None = None):
        """Semantics: pixels Shape [R, 3, H, W] in [-1, 1] -> (latents [R, C, h, w], noise
        [n, C, h, w], timesteps [n] int64), n = `rows` or R: the VAE posterior sampled, then ε, then
        uniform t, all from the run's generator in that order (what makes seeds and resumes
        reproducible). Methods that share one ε and t over several rows pass rows=1."""
        e = self.engine
        with torch.no_grad():
            dist = e.base.vae.encode(pixels.to(e.device, e.base.vae.dtype)).latent_dist
            latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=self.gen).to(dist.mean)
            latents = (latents * e.base.vae.config.scaling_factor).float()
        n = latents.shape[0] if rows is None else rows
        noise = torch.randn((n, *latents.shape[1:]), generator=self.gen).to(latents.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=self.gen).to(latents.device)
        return latents, noise, t

    def loss(self, batch: Batch) -> torch.Tensor:
        """The method-independent loss of one batch through the engine (module docstring)."""
        self.method.before_loss(self.engine, batch)
        x_t = self.noise_scheduler.add_noise(batch.latents, batch.noise, batch.timesteps)
        pred = engine_forward(self.engine, self.method, batch.texts, x_t, batch.timesteps).float()
        target = target_for(self.noise_scheduler, batch.latents, batch.noise, batch.timesteps)
        return self.method.loss(pred, target, batch, self.prior_weight)

    def train_step(self) -> float:
        total = 0.0
        for _ in range(self.accumulate):
            # each micro-batch is drawn, updates the method's state (before_loss) and is backpropagated
            # before the next is drawn, so it sees the state the previous one left (ChenDarYen's EMA)
            batch = self.make_batch()
            loss = self.loss(batch)
            if not torch.isfinite(loss.detach()):
                raise FloatingPointError(f"step {self.step}: the loss is {float(loss.detach())} (lr too high, "
                                         f"or a bad image)")
            (loss / self.accumulate).backward()  # exact for one: x / 1 == x
            total += float(loss.detach())
        self.method.after_backward()
        params = [p for p in self.params.values() if p.grad is not None]
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.method.after_step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total / self.accumulate)  # the mean over the micro-batches (exact for one)
        return self.losses[-1]

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "params": {k: p.detach().clone() for k, p in self.params.items()},
            "buffers": {k: b.detach().clone() for k, b in self.method.buffers().items()},
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": self.gen.get_state(),
            "numpy_rng": _np_state(self.rng),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "method": self.method.name,
        }

    def load_state_dict(self, state: dict, where: str) -> None:
        if state.get("method") != self.method.name or set(state["params"]) != set(self.params):
            raise TrainInputError(f"{where}: a checkpoint of another method or adapter layout "
                                  f"({state.get('method')!r}), not this run's ({self.method.name!r})")
        with torch.no_grad():
            for k, p in self.params.items():
                if state["params"][k].shape != p.shape:
                    raise TrainInputError(f"{where}: {k} has shape {tuple(state['params'][k].shape)}, "
                                          f"this run's is {tuple(p.shape)}")
                p.copy_(state["params"][k])
            buffers = self.method.buffers()
            if set(state.get("buffers", {})) != set(buffers):
                raise TrainInputError(f"{where}: its method state {sorted(state.get('buffers', {}))} is not this "
                                      f"run's {sorted(buffers)}")
            for k, b in buffers.items():
                b.copy_(state["buffers"][k])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["torch_rng"])
        self.rng.bit_generator.state = _np_unstate(state["numpy_rng"])
        self.step = int(state["step"])
        self.losses = [float(x) for x in state["losses"]]

    def save_checkpoint(self, output: str) -> str:
        path = os.path.join(output, CHECKPOINT.format(step=self.step))
        os.makedirs(path, exist_ok=True)
        torch.save(self.state_dict(), os.path.join(path, STATE_FILE + ".tmp"))
        os.replace(os.path.join(path, STATE_FILE + ".tmp"), os.path.join(path, STATE_FILE))
        return path

    def resume(self, output: str) -> str | None:
        """Load the latest checkpoint in `output` (None when there is none)."""
        if not os.path.isdir(output):
            return None
        found = []
        for n in os.listdir(output):
            head, _, num = n.partition("-")
            if head == "checkpoint" and num.isdigit() and os.path.isfile(os.path.join(output, n, STATE_FILE)):
                found.append((int(num), n))
        if not found:
            return None
        path = os.path.join(output, max(found)[1], STATE_FILE)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file is named, never executed
            raise TrainInputError(f"{path}: not a readable impasto checkpoint ({type(e).__name__}: {e})") from None
        self.load_state_dict(state, path)
        return path


def train(trainer: Trainer, output: str, *, checkpoint_every: int = 0, resume: bool = False,
          progress: bool = True) -> TrainResult:
    """Run `trainer` to its last step, checkpointing and resuming in `output`; then the method
    writes its result there. Returns a TrainResult."""
    os.makedirs(output, exist_ok=True)
    if resume:
        trainer.resume(output)
    t0 = time.perf_counter()
    bar = tqdm(total=trainer.steps, initial=trainer.step, desc=f"train {trainer.method.name}", disable=not progress)
    try:
        while trainer.step < trainer.steps:
            loss = trainer.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if checkpoint_every and trainer.step % checkpoint_every == 0:
                trainer.save_checkpoint(output)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    files = trainer.method.write(trainer.engine, output)
    return TrainResult(output, list(trainer.losses), seconds, files, files_nbytes(files), trainer.step)


def path_nbytes(path: str) -> int:
    """Bytes of a written file, or of the files in a written folder (an encoder's image_encoder/)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def files_nbytes(files: dict) -> int:
    """Bytes of every file (or folder) a method wrote: role -> path."""
    return sum(path_nbytes(p) for p in files.values())


def target_for(scheduler, latents, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise TrainInputError(f"scheduler prediction_type {kind!r}: training supports epsilon and v_prediction")


def masked_loss(pred, target, mask, n_instance: int, prior_weight: float) -> torch.Tensor:
    """Semantics (diffusers train_custom_diffusion.py, kept exactly):
        instance = mean_b [ Σ_{c,y,x} mask[b,0,y,x]·(pred - target)²[b,c,y,x] / Σ_{y,x} mask[b,0,y,x] ]
        prior    = mean over class rows and elements of (pred - target)²
        loss     = instance + prior_weight · prior   (prior only when class rows follow)
    The instance term sums channels over a per-pixel count, so it is C times a masked mean; the
    official script does the same and its learning rates were tuned with it.
    pred, target: Shape [R, C, h, w]; mask: Shape [n_instance, 1, h, w].
    """
    err = (pred - target) ** 2
    inst = err[:n_instance]
    loss = ((inst * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3]).clamp_min(1e-12)).mean()
    if pred.shape[0] > n_instance:
        loss = loss + prior_weight * err[n_instance:].mean()
    return loss


def _check_int(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise TrainInputError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}")


def _np_state(rng) -> dict:
    s = rng.bit_generator.state  # PCG64: ints beyond int64, kept as decimal strings
    return {"bit_generator": s["bit_generator"], "state": str(s["state"]["state"]), "inc": str(s["state"]["inc"]),
            "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}


def _np_unstate(d) -> dict:
    return {"bit_generator": d["bit_generator"], "state": {"state": int(d["state"]), "inc": int(d["inc"])},
            "has_uint32": int(d["has_uint32"]), "uinteger": int(d["uinteger"])}
