"""Perfusion on the miniature world (docs/training.md, "Perfusion"): the quality table, key
locking against no lock, operating points without retraining, two concepts in one request.

For each held-out object (impasto.eval.concept_set: 8 references with exact masks, held-out
prompts with fixed seeds), side by side in one run:
    base     the base model with the class word ("a star ...")
    lock     Perfusion (impasto.train.perfusion, key_lock=True), then the inference gates --gates
    nolock   the same run with key_lock=False (o*_K trained too), the same gates
Prompts name the concept by its placeholder alone ("two <sks> on a red background, flat"), as
Perfusion trains it ("a <sks>"); prompt fidelity is scored on the base's wording of the same
contexts (the probes parse "star", not "<sks>"). Concept fidelity = eval.concept_accuracy,
prompt fidelity = eval.prompt_fidelity over background, count and style.
The report: key lock against no lock at matched concept fidelity (both Pareto fronts read at
the concept fidelities they share), and each gate's mean point against Custom Diffusion's.
--pair A B: the two objects' locked concepts in one request (A's placeholder <sks>, B's
<sks2>; --pair-gates for each its own β/τ): each prompted alone with the other loaded, against
its solo fidelity; and a contact sheet of prompts naming both.
--plot: concept fidelity against prompt fidelity per object and averaged, one curve per lock
mode over the gates (Pareto front marked), the base, and Custom Diffusion's point (--cd, a JSON
file: benchmarks/perfusion_cd_points.json by default).
--captions --no-masks: the protocol's recipe (each reference captioned with its own size,
background and style, no loss mask), as Custom Diffusion's; --max-norm-ratio: the row's clamp.
--at-steps: a step front (one run per mode, resumed from step to step). --gate-inputs: the
gate's input s(e) by kind of position for the trained files. --replot: report and plot joined
JSON files of earlier runs; files run with --split validation choose the operating points
(`choose`) that the test split's files are then read at, and only the test split is plotted.

    python benchmarks/bench_perfusion.py --objects sparkle moon arrow --captions --no-masks --steps 500 \\
        --json out.json --plot docs/perfusion_pareto.png --pair sparkle arrow --sheet docs/perfusion_pair.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import torch
from PIL import Image

import impasto
from impasto import eval as ev
from impasto.train import perfusion

# Custom Diffusion's (concept, prompt) points per object, drawn on the same axes: a file, so a
# newer Custom Diffusion result is one edit (or --cd FILE) away; {"label": ..., "points": {obj: [c, p]}}.
CD_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "perfusion_cd_points.json")


def load_cd(path):
    """(points {object: (concept, prompt)}, label) from a JSON file as CD_FILE, or as
    benchmarks/cd_points.json ({object: {"cd": [c, p], "ft": [c, p]}}: its "cd" points)."""
    with open(path) as f:
        d = json.load(f)
    if "points" not in d:
        return {k: tuple(v["cd"]) for k, v in d.items()}, f"Custom Diffusion ({os.path.basename(path)})"
    return {k: tuple(v) for k, v in d["points"].items()}, d.get("label", "Custom Diffusion")


def evaluate(engine, cs, obj, adapters, phrase, args):
    """(concept fidelity, prompt fidelity, images) over the first args.prompts held-out prompts."""
    n = args.prompts
    prompts = [t.format(phrase) for t, _ in cs.templates[:n]]
    reqs = [impasto.Request(p, adapters=adapters, seed=s, steps=args.sample_steps, guidance=7.5)
            for p, s in zip(prompts, cs.seeds[:n])]
    outs = engine.generate_batch(reqs)
    for o in outs:
        if o.error is not None:
            raise o.error
    images = [o.images[0] for o in outs]
    pf = ev.prompt_fidelity(images, cs.prompts(cs.class_word)[:n], attributes=ev.CONTEXT_ATTRIBUTES)
    return ev.concept_accuracy(images, obj), pf["overall"], images


def train(engine, cs, obj, lock, args, steps):
    """Train one concept to `steps` (resuming the latest checkpoint in args.work, so a finished run
    is reused and --at-steps continues one run); returns (TrainResult, info)."""
    out = os.path.join(args.work, f"{obj}-{'lock' if lock else 'nolock'}")
    cached = os.path.isfile(os.path.join(out, f"checkpoint-{steps}", "state.pt"))
    done = [int(n.split("-")[1]) for n in (os.listdir(out) if os.path.isdir(out) else []) if n.startswith("checkpoint-")]
    start = max([d for d in done if d <= steps], default=0)
    load0, t0 = os.getloadavg()[0], time.perf_counter()
    # --captions: each reference captioned with its own size, background and style, the placeholder
    # alone naming the concept (as the prompts do): "a large <sks> on a gray background, flat"
    captions = cs.reference_captions("{placeholder}") if args.captions else None
    r = perfusion(engine, cs.images, masks=cs.masks if args.masks else None, super_word=cs.class_word,
                  steps=steps, lr_embedding=args.lr_embedding, lr_value=args.lr_value, batch_size=args.batch_size,
                  accumulate=args.accumulate, beta=args.train_beta, tau=args.train_tau,
                  key_lock=lock, seed=args.seed, output=out, progress=False, checkpoint_every=steps, resume=True,
                  captions=captions, max_norm_ratio=args.max_norm_ratio)
    seconds = time.perf_counter() - t0
    info = {"train_seconds": None if cached else seconds, "trained_from": start,
            "s_per_step": None if cached else seconds / (steps - start),
            "load": None if cached else [load0, os.getloadavg()[0]], "cached": cached,
            "final_loss_mean50": float(np.mean(r.losses[-50:])) if r.losses else None}
    # the placeholder row's norm against the super word's (its initializer): how far training grew it
    from impasto.adapters.rank1 import read_rank1

    emb = engine.base.text_encoder.get_input_embeddings().weight
    super_id = engine.base.tokenizer(cs.class_word, add_special_tokens=False).input_ids[0]
    info["row_norm"] = float(read_rank1(r.files["rank1"]).token_embedding.norm())
    info["super_row_norm"] = float(emb[super_id].detach().norm())
    return r, info


@torch.no_grad()
def gate_inputs(engine, path, prompts, placeholder="<sks>"):
    """Why a gate opens where: s(e) = i*ᵀC⁻¹e / (i*ᵀC⁻¹i*) of a trained file's i* over the held-out
    prompts' encodings, averaged by kind of position: the placeholder, the prompt's other words,
    the EOS, the padding after it (a 77-token chunk is mostly padding). Returns {kind: mean s}."""
    from impasto.adapters.rank1 import read_rank1
    from impasto.prompts import chunk_prompt, encode_prompts

    f = read_rank1(path)
    b = engine.base
    C_inv = engine.adapters.covariance().double()
    i = f.i_star.double()
    g = C_inv @ i / (i @ C_inv @ i)
    kinds = {"placeholder": [], "words": [], "eos": [], "padding": []}
    encs = encode_prompts(b.tokenizer, b.text_encoder, [(t, 1, 1, False) for t in prompts],
                          [{placeholder: f.token_embedding}] * len(prompts), engine.device)
    for text, enc in zip(prompts, encs):
        chunk = chunk_prompt(b.tokenizer, text, [placeholder])[0]
        s = (enc.double() @ g).tolist()
        marks = {pos for pos, _ in chunk.marks}
        # CLIP's unk id (the placeholder's slot) is its EOS id: the first EOS that is not a placeholder
        eos = next(k for k in range(1, len(chunk.ids)) if chunk.ids[k] == b.tokenizer.eos_token_id and k not in marks)
        kinds["placeholder"] += [s[k] for k in marks]
        kinds["words"] += [s[k] for k in range(1, eos) if k not in marks]
        kinds["eos"].append(s[eos])
        kinds["padding"] += s[eos + 1:]
    return {k: float(np.mean(v)) for k, v in kinds.items()}


def pareto(points):
    """The points no other point beats on both axes (concept, prompt), sorted by prompt fidelity."""
    front = [p for p in points if not any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)]
    return sorted(front, key=lambda p: p[1])


def pf_at(front, concept):
    """Prompt fidelity of a front at a concept fidelity, interpolated linearly between its two
    neighbouring points; None outside the front's concept range."""
    pts = sorted(front)
    if len(pts) == 1:
        return pts[0][1] if pts[0][0] == concept else None
    for (c0, p0), (c1, p1) in zip(pts, pts[1:]):
        if c0 <= concept <= c1:
            return p0 if c1 == c0 else p0 + (p1 - p0) * (concept - c0) / (c1 - c0)
    return None


def matched(front_a, front_b):
    """Prompt fidelity of two fronts at the same concept fidelity: at every front point of either
    whose concept fidelity lies in both fronts' ranges, each front's prompt fidelity there (linear
    between neighbours). Returns [(concept, prompt_a, prompt_b)] (empty: the ranges do not meet)."""
    if not front_a or not front_b:
        return []
    lo = max(min(c for c, _ in front_a), min(c for c, _ in front_b))
    hi = min(max(c for c, _ in front_a), max(c for c, _ in front_b))
    levels = sorted({c for c, _ in front_a + front_b if lo <= c <= hi})
    return [(c, pf_at(front_a, c), pf_at(front_b, c)) for c in levels]


def dominates(q, p):
    """q beats p on both axes (concept, prompt), strictly on at least one."""
    return q[0] >= p[0] and q[1] >= p[1] and q != p


def plot(results, path, cd, cd_label=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objs = list(dict.fromkeys(r["object"] for r in results if r["method"] != "pair"))
    panels = objs + (["mean"] if len(objs) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 4.6 * len(panels)), 5.6), squeeze=False)
    for ax, obj in zip(axes[0], panels):
        rows = [r for r in results if obj in ("mean", r["object"]) and r["method"] != "pair"]
        for method, colour in (("lock", "tab:blue"), ("nolock", "tab:orange")):
            pts = {}
            for r in rows:
                if r["method"] == method:
                    pts.setdefault((r["beta"], r["tau"], r["steps"]), []).append((r["concept"], r["prompt"]))
            if obj == "mean":
                pts = {k: v for k, v in pts.items() if len(v) == len(objs)}
            pts = {k: tuple(np.mean(v, 0)) for k, v in pts.items()}
            if not pts:
                continue
            xs = [p[1] for p in pts.values()]
            ys = [p[0] for p in pts.values()]
            steps = sorted({r["steps"] for r in rows if r["method"] == method})
            ax.scatter(xs, ys, c=colour, s=18, alpha=0.6,
                       label=f"Perfusion, {'key-locked' if method == 'lock' else 'no lock'} ({'/'.join(map(str, steps))} steps)")
            front = pareto(list(pts.values()))
            ax.plot([p[1] for p in front], [p[0] for p in front], c=colour)
            for (b, t, n), p in pts.items():
                if p in front:
                    ax.annotate(f"{b:g}/{t:g}" + (f" @{n}" if len(steps) > 1 else ""), (p[1], p[0]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        base = [(r["concept"], r["prompt"]) for r in rows if r["method"] == "base"]
        if base and (obj != "mean" or len(base) == len(objs)):
            b = np.mean(base, 0)
            ax.scatter([b[1]], [b[0]], marker="s", c="gray", label="base (class word)")
        cds = [cd[o] for o in (objs if obj == "mean" else [obj]) if o in cd]
        if cds and len(cds) == (len(objs) if obj == "mean" else 1):
            c = np.mean(cds, 0)
            ax.scatter([c[1]], [c[0]], marker="*", s=120, c="tab:red", label=cd_label or "Custom Diffusion")
        ax.set_title(obj if obj != "mean" else f"mean of {len(objs)}")
        ax.set_xlabel("prompt fidelity")
        ax.set_ylabel("concept fidelity")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=1 if len(panels) == 1 else 2)
    fig.tight_layout(rect=(0, 0.2, 1, 1))
    fig.savefig(path, dpi=110)


def pair_check(args, results, objs):
    a, b = objs
    engine = impasto.Engine.from_pretrained(args.model, device="cpu")
    files = {o: os.path.join(args.work, f"{o}-lock", "adapter.rank1.safetensors") for o in objs}
    engine.adapters.register("A", files[a], token="<sks>")
    engine.adapters.register("B", files[b], token="<sks2>")
    (ba, ta), (bb, tb) = parse_gates(args.pair_gates) if args.pair_gates else [(args.pair_beta, args.pair_tau)] * 2
    A, B = impasto.Adapter("A", beta=ba, tau=ta), impasto.Adapter("B", beta=bb, tau=tb)
    gates = {a: (ba, ta), b: (bb, tb)}
    out = []
    for obj, ph, solo, both in ((a, "<sks>", [A], [A, B]), (b, "<sks2>", [B], [A, B])):
        cs = ev.concept_set(obj, args.seed, args.split)
        c_solo, p_solo, _ = evaluate(engine, cs, obj, solo, ph, args)
        c_both, p_both, _ = evaluate(engine, cs, obj, both, ph, args)
        info = {"object": obj, "method": "pair", "beta": gates[obj][0], "tau": gates[obj][1], "solo": c_solo,
                "with_other": c_both, "kept": c_both / c_solo if c_solo else float("nan"), "prompt_solo": p_solo,
                "prompt_with_other": p_both}
        print(json.dumps(info), flush=True)
        out.append(info)
    if args.sheet:
        backgrounds = ("red", "yellow", "white", "orange")
        prompts = [f"a <sks> and a <sks2> on a {bg} background, flat" for bg in backgrounds]
        reqs = [impasto.Request(p, adapters=[A, B], seed=s, steps=args.sample_steps, guidance=7.5)
                for p in prompts for s in range(4)]
        ims = [o.images[0] for o in engine.generate_batch(reqs)]
        grid = Image.new("RGB", (64 * 4, 64 * len(backgrounds)), "white")
        for i, im in enumerate(ims):
            grid.paste(im.resize((64, 64), Image.NEAREST), ((i % 4) * 64, (i // 4) * 64))
        grid.save(args.sheet)
    engine.close()
    results += out


def report(results, objs, cd):
    """The table, key locking against no lock at matched concept fidelity, and each gate's mean
    point over the objects against Custom Diffusion's mean."""
    print(f"{'object':8} {'method':7} {'steps':>5} {'beta':>5} {'tau':>5} {'concept':>8} {'prompt':>7}")
    for r in results:
        if r["method"] != "pair":
            print(f"{r['object']:8} {r['method']:7} {r.get('steps', 0):5d} {r.get('beta', 0):5.2f} {r.get('tau', 0):5.2f} "
                  f"{r['concept']:8.3f} {r['prompt']:7.3f}")
    for r in results:
        if r["method"] == "pair":
            print(f"pair {r['object']}: solo {r['solo']:.3f}, with the other loaded {r['with_other']:.3f} "
                  f"(kept {r['kept']:.0%}); prompt {r['prompt_solo']:.3f} / {r['prompt_with_other']:.3f}")
    summary = {"matched": {}, "mean": {}}
    for obj in objs:
        fronts = {m: pareto([(r["concept"], r["prompt"]) for r in results if r["object"] == obj and r["method"] == m])
                  for m in ("lock", "nolock")}
        rows = matched(fronts["lock"], fronts["nolock"])
        summary["matched"][obj] = rows
        if fronts["lock"] and fronts["nolock"] and not rows:
            print(f"{obj}: the key-locked and no-lock fronts share no concept fidelity range")
        for m, other in (("lock", "nolock"), ("nolock", "lock")):
            if fronts[m] and fronts[other] and all(any(dominates(q, p) for q in fronts[other]) for p in fronts[m]):
                print(f"{obj}: every {m} front point is dominated by a {other} point")
                summary.setdefault("dominated", {})[obj] = m
        for c, a, b in rows:
            print(f"{obj}: at concept {c:.3f} key-locked prompt {a:.3f}, no lock {b:.3f} ({a - b:+.3f})")
        if rows:
            print(f"{obj}: mean gap {np.mean([a - b for _, a, b in rows]):+.3f} over {len(rows)} levels")
    if cd and objs and all(o in cd for o in objs):
        cd_mean = tuple(float(x) for x in np.mean([cd[o] for o in objs], 0))
        for method in ("lock", "nolock"):
            gates = {}
            for r in results:
                if r["method"] == method and r["object"] in objs:
                    gates.setdefault((r["beta"], r["tau"], r["steps"]), []).append((r["concept"], r["prompt"]))
            for (b, t, n), v in sorted(gates.items()):
                if len(v) == len(objs):
                    m = tuple(float(x) for x in np.mean(v, 0))
                    summary["mean"][f"{method} {b:g}/{t:g} @{n}"] = m
                    print(f"mean {method:6} {b:g}/{t:g} @{n}: {m[0]:.3f} / {m[1]:.3f} vs Custom Diffusion "
                          f"{cd_mean[0]:.3f} / {cd_mean[1]:.3f}: {'dominated' if dominates(cd_mean, m) else 'not dominated'}")
    return summary


def choose(val, test, objs, margin=0.05):
    """Operating points chosen on the validation split, read on the test split. Rule (fixed before
    the test split is read): per lock mode, the gate with the highest validation concept fidelity
    whose prompt fidelity is at most `margin` under the base's (ties: the higher prompt fidelity),
    one gate for all objects (on their mean) and one per object. Returns {mode: {...}}."""
    def rows(res, method, obj=None):
        return [r for r in res if r["method"] == method and (obj is None or r["object"] == obj)]

    def pick(points, base_pf):
        ok = [(c, p, g) for g, (c, p) in points.items() if p >= base_pf - margin] or [
            (c, p, g) for g, (c, p) in points.items()]
        return max(ok, key=lambda x: (x[0], x[1]))[2]

    out = {}
    for method in ("lock", "nolock"):
        if not rows(val, method):
            continue
        res = {"per_object": {}}
        gates = {}
        for r in rows(val, method):
            gates.setdefault((r["beta"], r["tau"]), {})[r["object"]] = (r["concept"], r["prompt"])
        gates = {g: v for g, v in gates.items() if all(o in v for o in objs)}
        base_pf = float(np.mean([r["prompt"] for r in rows(val, "base") if r["object"] in objs]))
        g = pick({g: tuple(np.mean([v[o] for o in objs], 0)) for g, v in gates.items()}, base_pf)
        at = {r["object"]: (r["concept"], r["prompt"]) for r in rows(test, method) if (r["beta"], r["tau"]) == g}
        res["one_gate"] = {"gate": list(g), "validation": [float(x) for x in np.mean([gates[g][o] for o in objs], 0)],
                           "test": {o: list(at[o]) for o in objs if o in at},
                           "test_mean": [float(x) for x in np.mean([at[o] for o in objs], 0)] if all(o in at for o in objs) else None}
        for obj in objs:
            vb = [r["prompt"] for r in rows(val, "base", obj)]
            pts = {(r["beta"], r["tau"]): (r["concept"], r["prompt"]) for r in rows(val, method, obj)}
            go = pick(pts, vb[0] if vb else 0.0)
            t = [(r["concept"], r["prompt"]) for r in rows(test, method, obj) if (r["beta"], r["tau"]) == go]
            res["per_object"][obj] = {"gate": list(go), "validation": list(pts[go]), "test": list(t[0]) if t else None}
        tests = [res["per_object"][o]["test"] for o in objs]
        res["per_object_test_mean"] = [float(x) for x in np.mean(tests, 0)] if all(tests) else None
        out[method] = res
    return out


def print_choice(choice, cd, objs):
    cd_mean = tuple(float(x) for x in np.mean([cd[o] for o in objs], 0)) if cd and all(o in cd for o in objs) else None
    for method, res in choice.items():
        og = res["one_gate"]
        print(f"{method}: one gate chosen on validation {og['gate'][0]:g}/{og['gate'][1]:g} "
              f"(validation mean {og['validation'][0]:.3f} / {og['validation'][1]:.3f}); test: "
              + ", ".join(f"{o} {c:.3f} / {p:.3f}" for o, (c, p) in og["test"].items()))
        for label, m in (("one gate", og["test_mean"]), ("per-object gates", res["per_object_test_mean"])):
            if m and cd_mean:
                print(f"{method}: test mean at {label} {m[0]:.3f} / {m[1]:.3f} vs Custom Diffusion {cd_mean[0]:.3f} / "
                      f"{cd_mean[1]:.3f}: {'dominated' if dominates(cd_mean, tuple(m)) else 'not dominated'}")
        for o, po in res["per_object"].items():
            t = po["test"]
            print(f"{method} {o}: gate {po['gate'][0]:g}/{po['gate'][1]:g} on validation "
                  f"{po['validation'][0]:.3f} / {po['validation'][1]:.3f}; test "
                  + (f"{t[0]:.3f} / {t[1]:.3f}" if t else "not measured"))


def parse_gates(text):
    """"0.4/0.15,0.5/0.1" -> [(0.4, 0.15), (0.5, 0.1)]."""
    out = []
    for g in text.split(","):
        b, _, t = g.partition("/")
        out.append((float(b), float(t)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny")
    p.add_argument("--objects", nargs="*", default=["sparkle", "moon", "arrow"])
    p.add_argument("--methods", nargs="+", default=["base", "lock", "nolock"], choices=("base", "lock", "nolock"))
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--at-steps", default=None,
                   help="e.g. 100,150,200: one run per lock mode, resumed from step to step, the sweep at each (a step front)")
    p.add_argument("--lr-embedding", type=float, default=0.006)
    p.add_argument("--lr-value", type=float, default=0.03)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per optimizer step, i*'s EMA on each (ChenDarYen: 4)")
    p.add_argument("--train-beta", type=float, default=0.75, help="the gate's β during training")
    p.add_argument("--train-tau", type=float, default=0.1, help="the gate's τ during training")
    p.add_argument("--gates", default="0.4/0.15,0.5/0.15,0.6/0.15,0.7/0.15,0.5/0.1,0.5/0.25",
                   help="the inference β/τ points swept on every trained concept (no retraining)")
    p.add_argument("--betas", default=None, help="with --taus: sweep their product instead of --gates")
    p.add_argument("--taus", default=None)
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts per point (the protocol: 48)")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps (the protocol: 25)")
    p.add_argument("--no-masks", dest="masks", action="store_false", help="train without the exact masks (mask 1)")
    p.add_argument("--captions", action="store_true",
                   help="caption each reference with its own size, background and style (ConceptSet.reference_captions, "
                        "the placeholder alone as the phrase) instead of 'a <sks>'")
    p.add_argument("--max-norm-ratio", type=float, default=None,
                   help="clamp the placeholder's row to this multiple of the super word's norm after every step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="eval.concept_set's prompts: choose gates and recipes on validation, report on test")
    p.add_argument("--edit-eos", dest="edit_eos", action="store_true", default=False,
                   help="the rank1 edit on each chunk's EOS too (families.rank1.EDIT_EOS = True), in training and serving")
    p.add_argument("--no-edit-eos", dest="edit_eos", action="store_false", help="the default: EOS left alone")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="bench_perfusion_work", help="trained files and checkpoints (reused on rerun)")
    p.add_argument("--pair", nargs=2, default=None, metavar=("A", "B"))
    p.add_argument("--pair-beta", type=float, default=0.6)
    p.add_argument("--pair-tau", type=float, default=0.15)
    p.add_argument("--pair-gates", default=None, help="A's and B's own β/τ, e.g. 0.5/0.15,0.75/0.1 (else --pair-beta/-tau for both)")
    p.add_argument("--sheet", default=None, help="PNG contact sheet of prompts naming both --pair concepts")
    p.add_argument("--cd", default=CD_FILE, help="Custom Diffusion's points, a JSON file as perfusion_cd_points.json")
    p.add_argument("--gate-inputs", action="store_true",
                   help="print s(e) by kind of position for the concepts trained in --work, run nothing else")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="the Pareto PNG")
    p.add_argument("--replot", nargs="+", default=None,
                   help="report and draw --plot from the --json files of earlier runs (results joined), run nothing")
    args = p.parse_args(argv)
    cd, cd_label = load_cd(args.cd)
    if args.replot:
        results, val = [], []
        for path in args.replot:
            d = json.load(open(path))
            # a file's split: its run's --split (files from before the option: the test split)
            split = d.get("args", {}).get("split", "test")
            (val if split == "validation" else results).extend(d["results"])
        objs = list(dict.fromkeys(r["object"] for r in results if r["method"] != "pair"))
        summary = report(results, objs, cd)
        if val:
            summary["chosen_on_validation"] = choose(val, results, objs)
            print_choice(summary["chosen_on_validation"], cd, objs)
            summary["validation"] = val
        if args.plot:
            plot(results, args.plot, cd, cd_label)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"sources": args.replot, "cd": cd, "cd_label": cd_label, "summary": summary,
                           "results": results}, f, indent=1)
        return
    torch.set_num_threads(args.threads)
    import impasto.adapters.families.rank1 as rank1_family

    rank1_family.EDIT_EOS = args.edit_eos
    if args.gate_inputs:
        engine = impasto.Engine.from_pretrained(args.model, device="cpu")
        rows = []
        for obj, method in itertools.product(args.objects, ("lock", "nolock")):
            path = os.path.join(args.work, f"{obj}-{method}", "adapter.rank1.safetensors")
            if os.path.isfile(path):
                cs = ev.concept_set(obj, args.seed, args.split)
                rows.append({"object": obj, "method": method,
                             **gate_inputs(engine, path, [t.format("<sks>") for t, _ in cs.templates[:args.prompts]])})
                print(json.dumps(rows[-1]), flush=True)
        engine.close()
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "gate_inputs": rows}, f, indent=1)
        return
    os.makedirs(args.work, exist_ok=True)
    if args.betas or args.taus:
        grid = list(itertools.product([float(x) for x in args.betas.split(",")], [float(x) for x in args.taus.split(",")]))
    else:
        grid = parse_gates(args.gates)
    step_list = sorted(int(x) for x in args.at_steps.split(",")) if args.at_steps else [args.steps]
    results = []
    for obj in args.objects:
        cs = ev.concept_set(obj, args.seed, args.split)
        engine = impasto.Engine.from_pretrained(args.model, device="cpu")
        if "base" in args.methods:
            t0 = time.perf_counter()
            c, pf, _ = evaluate(engine, cs, obj, [], cs.class_word, args)
            results.append({"object": obj, "method": "base", "concept": c, "prompt": pf,
                            "eval_seconds": time.perf_counter() - t0, "load": os.getloadavg()[0]})
            print(json.dumps(results[-1]), flush=True)
        for method, steps in itertools.product([m for m in args.methods if m != "base"], step_list):
            r, info = train(engine, cs, obj, method == "lock", args, steps)
            print(json.dumps({"object": obj, "method": method, "steps": r.steps, **info}), flush=True)
            name = f"{obj}-{method}-{steps}"
            engine.adapters.register(name, r.files["rank1"])
            for beta, tau in grid:
                t0 = time.perf_counter()
                c, pf, _ = evaluate(engine, cs, obj, [impasto.Adapter(name, beta=beta, tau=tau)], "<sks>", args)
                results.append({"object": obj, "method": method, "beta": beta, "tau": tau, "concept": c, "prompt": pf,
                                "bytes": r.nbytes, **info, "steps": r.steps,
                                "eval_seconds": time.perf_counter() - t0, "eval_load": os.getloadavg()[0]})
                print(json.dumps(results[-1]), flush=True)
        engine.close()
    if args.pair:
        pair_check(args, results, args.pair)
    summary = report(results, args.objects, cd)
    if args.plot:
        plot(results, args.plot, cd, cd_label)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "cd": cd, "cd_label": cd_label, "summary": summary, "results": results},
                      f, indent=1)


if __name__ == "__main__":
    main()
