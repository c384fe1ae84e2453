"""python -m raydistill.gpucheck: the command (see the package's docstring)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from . import AUTHORS_BUDGET, PGD20_BUDGET, REPO, TRAIN_BUDGET
from .parts import bench_plan, part_authors, part_bench, part_pgd20, part_pytest, part_train
from .realdata import run_leg, skip_all
from .record import Record
from .runner import Runner, probe, setup, skipped


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raydistill.gpucheck",
                                description="GPU smoke check and throughput figures (make gpu-check).")
    p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or "gpu-check",
                   help="folder for gpu-check.json and gpu-check.md (default $GPU_CHECK_OUT, else ./gpu-check)")
    p.add_argument("--wheels", default=os.environ.get("GPU_CHECK_WHEELS") or str(REPO / ".whl"),
                   help="folder of carried wheels, installed --no-deps (default $GPU_CHECK_WHEELS, else .whl/)")
    p.add_argument("--site", default=os.environ.get("GPU_CHECK_SITE"),
                   help="target folder of those installs (default: a temporary folder)")
    p.add_argument("--no-install", action="store_true",
                   help="do not install raydistill into the target folder (the checkout runs in any case)")
    p.add_argument("--budget", type=float, default=float(os.environ.get("GPU_CHECK_BUDGET_S") or 480),
                   help="seconds for the whole check (default $GPU_CHECK_BUDGET_S, else 480)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    t0 = time.monotonic()
    out = Path(args.out).expanduser().resolve()
    record = Record(out, args.budget)
    with tempfile.TemporaryDirectory(prefix="raydistill-gpu-check-") as tmp:
        work = Path(tmp)
        site = Path(args.site).expanduser().resolve() if args.site else work / "site"
        env = setup(record, Path(args.wheels).expanduser().resolve(), site, install=not args.no_install)
        info = probe(env)
        record.data["environment"] = info
        record.data["cuda"] = cuda = bool(info.get("cuda_available"))
        if not cuda:
            record.data["skip_reason"] = ("no CUDA: torch.cuda.is_available() is False" if "torch" in info
                                          else f"no PyTorch: {info.get('torch_error') or info.get('probe_error')}")
        record.save()
        print(f"[gpu-check] torch {info.get('torch')}, GPU {info.get('gpu_name') or 'none'}; writing {out}", flush=True)
        runner = Runner(record, env, t0 + args.budget, work)
        part_pytest(runner, info)
        plan = bench_plan(info.get("precisions", ["fp32", "bf16"]), info.get("compile_modes", ["none"]))
        if cuda:
            checkpoint = part_train(runner)
            part_pgd20(runner, checkpoint)
            part_authors(runner)
            run_leg(runner, info)
            for arch, precision, compile_mode, budget in plan:
                part_bench(runner, arch, precision, compile_mode, budget)
        else:
            reason = record.data["skip_reason"]
            record.part("train", skipped(reason, TRAIN_BUDGET))
            record.part("pgd20_check", skipped(reason, PGD20_BUDGET))
            record.part("authors_peeraid", skipped(reason, AUTHORS_BUDGET))
            skip_all(record, reason)
            for arch, precision, compile_mode, budget in plan:
                label = precision + ("+compile_" + compile_mode if compile_mode != "none" else "")
                record.part(f"bench:{arch}:{label}", skipped(reason, budget))
        record.save(final=True)
    print(f"[gpu-check] {record.data['status']} in {record.data['wall_s']}s: {out / 'gpu-check.md'}", flush=True)
    failed = [n for n, p in record.data["parts"].items() if p["status"] == "failed"]
    if failed:
        print(f"[gpu-check] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
