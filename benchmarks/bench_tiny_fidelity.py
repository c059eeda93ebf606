"""Measure the shipped miniature model: probe accuracy on unseen seeds, and the base model's
prompt fidelity on seen-vocabulary prompts (default 200 prompts, 25 steps, guidance 7.5).

    nice -n 19 python benchmarks/bench_tiny_fidelity.py --prompts 200 --steps 25 --out /tmp/tiny_fidelity.json

Writes one JSON record (and prints it); --sheet PATH also writes a contact sheet of the first 64.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=200)
    p.add_argument("--seed", type=int, default=200, help="fidelity_prompts stream (CI uses 100)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default=None)
    p.add_argument("--batch", type=int, default=50, help="requests per generate_batch call")
    p.add_argument("--probe-images", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None)
    p.add_argument("--sheet", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import impasto
    import impasto.eval as ev
    from impasto.tiny import world
    from impasto.tiny.probes import load_probes

    rec = {"config": vars(args)}
    # probes on an unseen generator seed, held-out objects and styles included
    d = world.dataset(4242, args.probe_images, novel_objects=0.25, novel_styles=0.3)
    probs = load_probes().read(d["images"])
    rec["probe_accuracy_seed4242"] = {k: float((probs[k].argmax(1) == d["labels"][k]).mean()) for k in probs}

    eng = impasto.Engine.from_pretrained("tiny", device="cpu", scheduler=args.scheduler)
    pairs = ev.fidelity_prompts(args.prompts, seed=args.seed)
    images = []
    t0 = time.perf_counter()
    for s in range(0, len(pairs), args.batch):
        reqs = [impasto.Request(q, seed=sd, steps=args.steps, guidance=args.guidance) for q, sd in pairs[s : s + args.batch]]
        outs = eng.generate_batch(reqs)
        images += [o.images[0] for o in outs]
    rec["generate_seconds"] = time.perf_counter() - t0
    scores = ev.prompt_fidelity(images, [q for q, _ in pairs])
    scores.pop("found")
    rec["prompt_fidelity"] = scores
    rec["clip_t"] = ev.clip_text_similarity(images, [q for q, _ in pairs])
    if args.sheet:
        from PIL import Image

        n = min(64, len(images))
        cols = 8
        w, h = images[0].size
        sheet = Image.new("RGB", (cols * w, ((n + cols - 1) // cols) * h), "white")
        for i, im in enumerate(images[:n]):
            sheet.paste(im, ((i % cols) * w, (i // cols) * h))
        sheet.resize((sheet.width * 4, sheet.height * 4), Image.NEAREST).save(args.sheet)
    text = json.dumps(rec, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return rec


if __name__ == "__main__":
    main()
