"""The bench's command line: options, their checks, the printed report, ``main``."""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .. import fastpath, plugins
from ..cli import ArgParser, nonneg_int, positive_int
from ..config import add_run_options
from ..errors import UsageError, cli_entry
from .checks import pgd20_check
from .configs import Bench
from .measure import machine
from .overhead import ray_overhead
from .races import ablation, authors_peeraid_step, compare_authors_peeraid
from .throughput import bench_method


def precisions() -> tuple[str, ...]:
    """The precisions the option table accepts (train's --precision): the bench takes the same."""
    from ..config import EXPERIMENT_FIELDS

    return tuple(EXPERIMENT_FIELDS["precision"].metadata["choices"] or ("fp32", "bf16"))


def parser() -> ArgParser:
    p = ArgParser(prog="python -m raydistill.bench",
                  description="Training-throughput benchmark: images/s of each method's production step, its "
                              "passes per network, evaluation speed, memory; races against the authors' PeerAiD step.")
    p.add_argument("--methods", default="pgd_at,peeraid", help="comma-separated methods (default pgd_at,peeraid)")
    p.add_argument("--student", default="resnet18", help="student architecture (default resnet18)")
    p.add_argument("--peer", help="peer architecture of online methods (default: the student's)")
    p.add_argument("--dataset", default="synthetic", help="synthetic (default; any shape) or a dataset name")
    p.add_argument("--data-dir", help="dataset folder (not needed for synthetic)")
    p.add_argument("--train-size", type=positive_int, help="a real dataset's training images (stratified subset; "
                                                          "default all): an epoch of --ray-overhead")
    p.add_argument("--image-size", type=positive_int, default=32, help="synthetic images' side (default 32)")
    p.add_argument("--num-classes", type=positive_int, default=10, help="synthetic classes (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps (per round in races; default 10)")
    p.add_argument("--warmup", type=positive_int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--attack-steps", type=positive_int, default=10, help="PGD steps of the training attack (default 10)")
    p.add_argument("--precision", choices=precisions(), default="fp32",
                   help=f"{', '.join(precisions())} (the option table's; default fp32)")
    p.add_argument("--threads", type=positive_int, help="intra-op threads (default: the CPUs this process may use)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="a hyperparameter of the methods that have it (repeatable)")
    p.add_argument("--eval-examples", type=positive_int, default=256, help="test images for the evaluation speed")
    p.add_argument("--eval-batch-size", type=positive_int, default=256)
    add_run_options(p, only={f.name for f in dataclasses.fields(fastpath.FastPath)})  # the option table's speed flags
    g = p.add_argument_group("modes")
    g.add_argument("--compare-authors-peeraid", action="store_true",
                   help="race the authors'-code PeerAiD step against ours (strict fp32 and fast path)")
    g.add_argument("--ablation", action="store_true", help="race the first method's step with each feature")
    g.add_argument("--rounds", type=positive_int, default=5,
                   help="rounds of the races; with --ray-overhead, pairs of runs (default 5)")
    g.add_argument("--ray-overhead", action="store_true",
                   help="also compare a 1-worker TorchTrainer run's epoch time with the in-process loop")
    g.add_argument("--beside-idle-ray", action="store_true",
                   help="with --ray-overhead: also time the in-process loop beside an idle Ray instance (Ray's "
                        "processes running, none of them working): the part of the overhead that is CPU contention")
    g.add_argument("--plain-loop", action="store_true",
                   help="with --ray-overhead: also time a plain single-process PyTorch loop over the same tensors with "
                        "the same passes (natural or pgd_at): the production loop's throughput as a fraction of it")
    g.add_argument("--ray-epochs", type=positive_int, default=6, help="epochs of those runs (default 6)")
    g.add_argument("--ray-skip-epochs", type=nonneg_int,
                   help="epochs of each run not timed (default: half; Ray's daemons start up beside the first)")
    g.add_argument("--pgd20-check", metavar="CHECKPOINT", help="PGD-20 accuracy of a checkpoint: fp32 vs fast path")
    p.add_argument("--summary-json", help="write the results as JSON here")
    plugins.add_option(p)
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    from ..config import parse_set
    from ..data import DATASETS
    from ..methods import get_method
    from ..models import MODELS

    args = parser().parse_args(argv)
    plugins.use(args.plugin)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        raise UsageError("--methods is empty; give e.g. --methods pgd_at,peeraid")
    classes = [get_method(m) for m in args.methods]
    for arch in (args.student, args.peer):
        if arch is not None:
            MODELS.get(arch)
    DATASETS.get(args.dataset)
    args.hp = parse_set(args.set)
    for name in args.hp:
        if not any(name in c.hparams for c in classes):
            raise UsageError(f"--set {name}: none of {', '.join(args.methods)} has a hyperparameter '{name}'")
    defaults = fastpath.FastPath()
    for f in dataclasses.fields(defaults):
        if getattr(args, f.name) is None:
            setattr(args, f.name, getattr(defaults, f.name))
    if args.beside_idle_ray and not args.ray_overhead:
        raise UsageError("--beside-idle-ray is a part of --ray-overhead: give both")
    if args.plain_loop:
        from .plain import METHODS as PLAIN

        if not args.ray_overhead:
            raise UsageError("--plain-loop is a part of --ray-overhead: give both")
        if args.methods[0] not in PLAIN:
            raise UsageError(f"--plain-loop times the first of --methods, which must be one of {', '.join(PLAIN)} "
                             f"(the methods with a plain loop), not {args.methods[0]}")
    if args.ray_skip_epochs is not None and args.ray_skip_epochs >= args.ray_epochs:
        raise UsageError(f"--ray-skip-epochs {args.ray_skip_epochs} leaves none of --ray-epochs {args.ray_epochs} to time")
    if args.compare_authors_peeraid:
        authors_peeraid_step()  # the checkout's reference code: one error line before anything runs without it
    if args.pgd20_check and not os.path.exists(args.pgd20_check):
        raise UsageError(f"--pgd20-check '{args.pgd20_check}' does not exist")
    if args.summary_json:
        folder = Path(args.summary_json).expanduser().resolve().parent
        if folder.exists() and not os.access(folder, os.W_OK):
            raise UsageError(f"--summary-json {args.summary_json}: folder is not writable")
    return args


def print_result(r: dict[str, Any]) -> None:
    passes = "  ".join(f"{n} {p['forward']}f/{p['backward']}b" for n, p in r["passes"].items())
    mem = f"{r['peak_mem_mb']:.0f} MiB" if r["peak_mem_mb"] is not None else "n/a"
    print(f"{r['method']:>8}: {r['images_per_s']:8.1f} img/s train | eval clean "
          f"{r['eval_images_per_s']['clean']:.0f}, pgd20 {r['eval_images_per_s']['pgd20']:.1f} img/s | "
          f"data {100 * r['data_share']:.1f}% | {passes} | peak {mem}", flush=True)


def print_report(out: dict[str, Any]) -> None:
    """Everything but the per-method rows, which are printed as each method finishes."""
    for key in ("ablation", "compare_authors_peeraid"):
        for name, v in out.get(key, {}).items():
            print(f"{key} {name:>28}: {v['images_per_s']:8.1f} img/s  x{v['speedup']:.3f} (median of rounds)")
    if "compare_authors_peeraid" in out:
        c = out["compare_authors_peeraid"]
        print(f"PeerAiD vs the authors' step: strict fp32 x{c['ours_fp32']['speedup']:.3f} (target >= 1.05), "
              f"fast path x{c['ours_fast']['speedup']:.3f} (target >= 2.0)")
    if "ray_overhead" in out:
        r = out["ray_overhead"]
        print(f"Ray overhead: {r['overhead_pct']:+.1f}% (median of {len(r['pair_overheads_pct'])} pairs, from "
              f"{min(r['pair_overheads_pct']):+.1f}% to {max(r['pair_overheads_pct']):+.1f}%; target <= 5%); pooled "
              f"epoch {r['ray']['epoch_time_s']:.3f}s vs in-process {r['in_process']['epoch_time_s']:.3f}s"
              f" = {r['pooled_overhead_pct']:+.1f}%")
        if "beside_idle_ray_pct" in r:
            p = r["pair_beside_idle_ray_pct"]
            print(f"In-process loop beside an idle Ray instance: {r['beside_idle_ray_pct']:+.1f}% (median of {len(p)} "
                  f"rounds, from {min(p):+.1f}% to {max(p):+.1f}%): Ray's processes competing for the CPU")
        if "ray_vs_plain" in r:
            p = r["pair_ray_vs_plain"]
            print(f"Against the plain PyTorch loop (same tensors and passes): Ray Train at x{r['ray_vs_plain']:.3f} of its "
                  f"throughput (median of {len(p)} rounds, from x{min(p):.3f} to x{max(p):.3f}; goal >= "
                  f"{r['target_vs_plain']}), the in-process loop at x{r['in_process_vs_plain']:.3f}")
        if r.get("idle_ray_cpu_pct") is not None:
            print(f"Idle Ray's processes used {r['idle_ray_cpu_pct']:.1f}% of this machine's CPUs (median of rounds): "
                  f"a loop on all of them loses at least that share of them to Ray")
    if "pgd20_check" in out:
        c = out["pgd20_check"]
        print(f"PGD-20 on {c['n_examples']} images: fp32 {c['pgd20_acc_fp32']:.4f}, fast path "
              f"{c['pgd20_acc_fast']:.4f}, difference {c['difference_points']:+.2f} points (target within 0.5)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out: dict[str, Any] = {"machine": machine(device)}
    if args.pgd20_check:
        out["pgd20_check"] = pgd20_check(args.pgd20_check, args)
    else:
        with tempfile.TemporaryDirectory(prefix="raydistill-bench-") as workdir:
            bench = Bench(args, workdir)
            if args.compare_authors_peeraid:
                out["compare_authors_peeraid"] = compare_authors_peeraid(bench)
            elif args.ablation:
                out["ablation"] = ablation(bench, args.methods[0])
            else:
                out["results"] = []
                for m in args.methods:  # one line per method as it finishes: a long benchmark shows progress
                    out["results"].append(bench_method(bench, m))
                    print_result(out["results"][-1])
                    if args.summary_json:  # the methods so far: a run cut off keeps what it measured
                        from ..train import write_json

                        write_json(args.summary_json, {**out, "complete": False})
            if args.ray_overhead:
                out["ray_overhead"] = ray_overhead(bench, args.methods[0])
            out["machine"]["threads"] = torch.get_num_threads()
    print_report(out)
    if args.summary_json:
        from ..train import write_json

        write_json(args.summary_json, {**out, "complete": True})
    return 0


run = cli_entry(main)
