"""The GPU check's real-data leg: PGD-AT and PeerAiD trained in-process on the full Fashion-MNIST training set,
then clean and PGD-20 on its 10,000 test images and AutoAttack on the first 1,000 (``evaluate``, stored units).

The four IDX files travel with the checkout: ``make gpu-data`` copies them into ``data/FashionMNIST/raw/``
(git-ignored; name ``data/FashionMNIST`` in the device call's ``carry``, about 30 MB), or the GPU machine has
Debian's package. ``GPU_CHECK_DATA`` names another folder (default ``./data``). The probe says where they are;
without them, without CUDA, or without pyautoattack (its wheel: scripts/fetch-gpu-wheels.sh) the parts concerned
are recorded as skipped with the reason, in no time.

Parts, per method: ``realdata:train:METHOD`` (``train METHOD --workers 0 --tracking-uri none``, fashion_mnist's
defaults but the epochs: ``REALDATA["epochs"]``, decaying for the last), ``realdata:eval:METHOD`` (clean,
pgd20 on ``test_examples``), ``realdata:aa:METHOD`` (aa on the first ``aa_examples``).
"""
from __future__ import annotations

from typing import Any

from . import REALDATA, REALDATA_BUDGET
from .runner import Runner, skipped


def part_names() -> list[str]:
    return [f"realdata:{kind}:{m}" for m in REALDATA["epochs"] for kind in ("train", "eval", "aa")]


def skip_all(record, reason: str) -> None:
    for name in part_names():
        record.part(name, skipped(reason, REALDATA_BUDGET[name.split(":")[1]]))


def run_leg(runner: Runner, info: dict[str, Any], settings: dict[str, Any] | None = None) -> None:
    """The leg's parts (see the module's docstring); ``settings`` override ``REALDATA`` (a CPU smoke: a
    training subset, fewer test images, ``budgets`` overriding ``REALDATA_BUDGET``)."""
    s = {**REALDATA, **(settings or {})}
    budget = {**REALDATA_BUDGET, **s.get("budgets", {})}
    record = runner.record
    record.data["realdata"] = figures = {}
    if not info.get("fashion_mnist"):
        skip_all(record, "Fashion-MNIST's IDX files are not here: make gpu-data, and carry data/FashionMNIST "
                         "(or set GPU_CHECK_DATA; " + str(info.get("fashion_mnist_error") or "not found") + ")")
        return
    data = ["--dataset", "fashion_mnist", "--data-dir", info["fashion_mnist"]]
    for method, epochs in s["epochs"].items():
        summary = runner.work / f"realdata-train-{method}.json"
        argv = ["-m", "raydistill.train", method, *data, "--student", s["student"], "--epochs", str(epochs),
                "--lr-milestones", str(max(epochs - 1, 1)), "--workers", "0", "--tracking-uri", "none",
                "--test-attacks", "clean", "--storage-path", str(runner.work / "runs"),
                "--name", f"gpu-check-realdata-{method}", "--summary-json", str(summary),
                *(["--train-size", str(s["train_size"])] if s.get("train_size") else []), *s.get("train_args", [])]
        entry = runner.run(f"realdata:train:{method}", argv, budget["train"], summary)
        result = entry.pop("result", None) or {}
        runner.record.part(f"realdata:train:{method}", entry)
        row = figures[method] = {"epochs": epochs, "train_images": s.get("train_size") or 59000,
                                 "train_wall_s": entry.get("wall_s"), "val_best_pgd10_acc": result.get("val_best_pgd10_acc")}
        record.save()
        ckpt = result.get("checkpoint") if entry["status"] == "ok" else None
        for kind, attacks, n in (("eval", "clean,pgd20", s["test_examples"]), ("aa", "aa", s["aa_examples"])):
            name = f"realdata:{kind}:{method}"
            if ckpt is None:
                record.part(name, skipped(f"no checkpoint: realdata:train:{method} did not finish", budget[kind]))
                continue
            if kind == "aa" and not info.get("have", {}).get("pyautoattack"):
                record.part(name, skipped("pyautoattack is not installed (its wheel: bash scripts/fetch-gpu-wheels.sh)",
                                          budget[kind]))
                continue
            out = runner.work / f"realdata-{kind}-{method}.json"
            entry = runner.run(name, ["-m", "raydistill.evaluate", ckpt, "--attacks", attacks, "--n-examples", str(n),
                                      "--batch-size", "500", "-q", "--storage-path", str(runner.work / "evals"),
                                      "--summary-json", str(out)], budget[kind], out)
            metrics = (entry.pop("result", None) or {}).get("metrics", {})
            row.update({k: v for k, v in metrics.items()}, **{f"{kind}_examples": n, f"{kind}_wall_s": entry.get("wall_s")})
            record.part(name, entry)
