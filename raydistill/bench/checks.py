"""``--pgd20-check``: a fixed model's PGD-20 accuracy in fp32 and on the fast path."""
from __future__ import annotations

import argparse
import copy
from typing import Any

import torch

from .. import fastpath


def pgd20_check(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """PGD-20 accuracy of a fixed model in fp32 and on the fast path (bf16 autocast, channels_last,
    folded BatchNorm) on the first ``--eval-examples`` test images of the checkpoint's dataset (else
    ``--dataset``), with its eps and step size, the same random starts."""
    from ..checkpoint import load_model
    from ..data import load_dataset
    from ..evaluation import evaluate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, meta = load_model(path, device)
    dataset = meta.get("dataset") or args.dataset
    d = load_dataset(dataset, data_dir=args.data_dir or meta.get("data_dir"), val_size=0)
    x, y = d.test_x[:args.eval_examples], d.test_y[:args.eval_examples]
    eps, step = float(meta.get("eps", 8 / 255)), float(meta.get("step_size", 2 / 255))
    kw = dict(eps=eps, step_size=step, batch_size=args.eval_batch_size, device=device)
    fp32 = evaluate(model, x, y, ["pgd20"], **kw)["pgd20_acc"]
    fast_model = fastpath.prepare(copy.deepcopy(model), fastpath.FastPath(channels_last=True, fold_bn=True))
    with fastpath.autocast(device, "bf16"):
        fast = evaluate(fastpath.inference_view(fast_model), x, y, ["pgd20"], **kw)["pgd20_acc"]
    return {"checkpoint": path, "dataset": dataset, "n_examples": len(y), "pgd20_acc_fp32": fp32,
            "pgd20_acc_fast": fast, "difference_points": 100 * (fast - fp32), "target_points": 0.5}
