"""pyautoattack called directly, the way its README shows, on the first N test images of a raydistill
checkpoint: the reference that ``python -m raydistill.evaluate --attacks aa`` is timed against (BENCHMARKS.md,
"AutoAttack: sharded evaluation against pyautoattack").

    python benchmarks/aa_direct.py CHECKPOINT --n-examples 96 [--batch-size 96] [--seed 0] [--out correct.npy]

One process, one AutoAttack (standard version, the checkpoint's eps), torch's default thread count. ``--out``
saves the per-image robust flags, so they can be compared with evaluate's ``per_image.parquet`` (with
``--batch-size`` N and ``--seed`` S, evaluate's single chunk is attacked with seed S, as here).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--n-examples", type=int, default=96)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out")
    args = p.parse_args()

    from pyautoattack import AutoAttack

    from raydistill.checkpoint import load_model
    from raydistill.data import load_dataset, to_float

    model, meta = load_model(args.checkpoint, "cpu")
    data = load_dataset(meta["dataset"], meta.get("data_dir"), val_size=0)
    x, y = to_float(data.test_x[:args.n_examples]), data.test_y[:args.n_examples]
    for p_ in model.parameters():
        p_.requires_grad_(False)
    start = time.perf_counter()
    adversary = AutoAttack(model, norm="Linf", eps=float(meta["eps"]), version="standard", seed=args.seed, device="cpu")
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=args.batch_size or len(x))
    with torch.no_grad():
        correct = (model(x_adv).argmax(1) == y).numpy()
    print(f"pyautoattack: {len(x)} images, robust accuracy {correct.mean():.4f}, {time.perf_counter() - start:.1f}s")
    if args.out:
        np.save(args.out, correct)


if __name__ == "__main__":
    main()
