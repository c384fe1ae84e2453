"""The check's record: held as a dict, written as gpu-check.json and gpu-check.md after each part."""
from __future__ import annotations

import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

from . import BATCH, BENCH_STEPS, BENCH_WARMUP, BF16_PEAK_TFLOPS, REALDATA, TRAIN

# ============================================================================= the record
class Record:
    """The check's results: held as a dict, written (JSON and Markdown, atomically) after each part."""

    def __init__(self, out: Path, budget: float):
        self.out, self.t0 = out, time.monotonic()
        self.data: dict[str, Any] = {
            "schema": 1, "status": "running", "started": _now(), "finished": None, "budget_s": budget,
            "wall_s": 0.0, "cuda": False, "skip_reason": None, "environment": {}, "setup": {}, "parts": {},
            "bench": [], "pgd20_check": None, "authors_peeraid": None, "train": None, "realdata": None}

    def part(self, name: str, entry: dict[str, Any]) -> None:
        self.data["parts"][name] = entry
        self.save()

    def save(self, final: bool = False) -> None:
        self.data["wall_s"] = round(time.monotonic() - self.t0, 1)
        if final:
            self.data["finished"] = _now()
            bad = [p["status"] for p in self.data["parts"].values() if p["status"] in ("failed", "timeout")]
            self.data["status"] = "partial" if bad else "done"
        self.out.mkdir(parents=True, exist_ok=True)
        _write(self.out / "gpu-check.json", json.dumps(self.data, indent=2, default=str) + "\n")
        _write(self.out / "gpu-check.md", markdown(self.data))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, (int, float)) else str(v)


def _passes(p: dict | None) -> str:
    if not p:
        return "-"
    return ", ".join(f"{n} {c['forward']}f/{c['backward']}b" for n, c in p.items())


def markdown(d: dict[str, Any]) -> str:
    e = d.get("environment", {})
    gpu = e.get("gpu_name") or "none (no CUDA)"
    lines = ["# raydistill GPU check", "",
             f"- status: **{d['status']}**; started {d['started']}, finished {d['finished'] or '-'}, "
             f"wall {d['wall_s']} s of a {d['budget_s']:.0f} s budget",
             f"- GPU: {gpu}" + (f" (capability {e['gpu_capability']}, {e['gpu_memory_gib']} GiB)" if e.get("gpu_capability") else ""),
             f"- torch {e.get('torch', '-')} (CUDA {e.get('torch_cuda') or '-'}), Python {e.get('python', '-')}; "
             f"precisions in the option table: {', '.join(e.get('precisions', [])) or '-'}"]
    if d.get("skip_reason"):
        lines.append(f"- GPU parts skipped: {d['skip_reason']}")
    lines += ["", "## Parts", "", "| part | status | wall s | budget s | note |", "| --- | --- | --- | --- | --- |"]
    for name, p in d["parts"].items():
        note = p.get("reason") or ""
        if p.get("counts"):
            note = (note + " " if note else "") + ", ".join(f"{n} {k}" for k, n in p["counts"].items())
        if p.get("status") == "failed" and p.get("output_tail"):
            note = (note + " " if note else "") + p["output_tail"].splitlines()[-1][:200]
        lines.append(f"| {name} | {p['status']} | {_fmt(p.get('wall_s'))} | {_fmt(p.get('budget_s'), '.0f')} | "
                     f"{note.replace('|', '/')} |")
    lines += ["", f"## Training throughput (bench: synthetic 32x32, batch {BATCH}, 10-step PGD, "
                  f"{BENCH_STEPS} timed steps after {BENCH_WARMUP})", ""]
    if d["bench"]:
        lines += ["| method | arch | precision | images/s | passes (forward/backward per step) | peak memory MiB "
                  f"| TFLOP/s | share of the bf16 peak ({BF16_PEAK_TFLOPS:.0f} TFLOP/s) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['method']} | {r['arch']} | {r['precision']} | {_fmt(r['images_per_s'])} | "
                  f"{_passes(r['passes'])} | {_fmt(r['peak_mem_mb'], '.0f')} | {_fmt(r.get('tflops_per_s'))} | "
                  f"{_fmt(100 * r['bf16_peak_share']) + ' %' if r.get('bf16_peak_share') else '-'} |" for r in d["bench"]]
    else:
        lines.append("No figures: " + (d.get("skip_reason") or "no bench part finished a method") + ".")
    lines += ["", "## PGD-20: fp32 vs the fast path (fixed model)", ""]
    c = d.get("pgd20_check")
    if c:
        lines += [f"- {c['n_examples']} test images of {c['dataset']}, checkpoint of the train part",
                  f"- fp32 {c['pgd20_acc_fp32']:.4f}, fast path {c['pgd20_acc_fast']:.4f}, difference "
                  f"{c['difference_points']:+.2f} points (target within {c['target_points']})"]
    else:
        lines.append("No figures: " + (d["parts"].get("pgd20_check", {}).get("reason") or "not run") + ".")
    lines += ["", "## PeerAiD: our step against the authors'-code step (resnet18, batch 128)", ""]
    a = d.get("authors_peeraid")
    if a:
        lines += [f"- {name}: {_fmt(v['images_per_s'])} images/s, x{v['speedup']:.3f} the authors' step"
                  for name, v in a.items() if isinstance(v, dict) and "speedup" in v]
        lines.append("- targets: strict fp32 at least x1.05, the fast path at least x2.0")
    else:
        lines.append("No figures: " + (d["parts"].get("authors_peeraid", {}).get("reason") or "not run") + ".")
    lines += ["", f"## Train: {TRAIN['epochs']}-epoch {TRAIN['method']}, in-process, tracking off", ""]
    t = d.get("train")
    if t:
        m = t.get("metrics") or {}
        lines += [f"- {t['method']} on {t['dataset']} ({t['student']}), epochs {t['epochs_completed']}, "
                  f"best epoch {t['best_epoch']}, wall {_fmt(t['wall_time_s'])} s",
                  "- final test figures: " + (", ".join(f"{k} {v:.4f}" for k, v in m.items()) or "-"),
                  f"- best validation PGD-10: {_fmt(t.get('val_best_pgd10_acc'), '.4f')}"]
    else:
        lines.append("No figures: " + (d["parts"].get("train", {}).get("reason") or "not run") + ".")
    lines += ["", f"## Real data: Fashion-MNIST, {REALDATA['student']}, eps 0.1 (PGD-10 of step 0.025 in training), "
                  "in-process", ""]
    r = d.get("realdata")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f} %"  # noqa: E731
    if r:
        lines += ["| method | epochs x training images | train s | clean | PGD-20 (test images) | AutoAttack (first N) "
                  "| evaluation s |", "| --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {m} | {v['epochs']} x {v['train_images']} | {_fmt(v.get('train_wall_s'))} | {pct(v.get('clean_acc'))} | "
                  f"{pct(v.get('pgd20_acc'))} ({v.get('eval_examples', '-')}) | {pct(v.get('aa_acc'))} "
                  f"({v.get('aa_examples', '-')}) | {_fmt((v.get('eval_wall_s') or 0) + (v.get('aa_wall_s') or 0))} |"
                  for m, v in r.items()]
    else:
        reason = next((p.get("reason") for n, p in d["parts"].items() if n.startswith("realdata:")), None)
        lines.append("No figures: " + (reason or "not run") + ".")
    return "\n".join(lines) + "\n"
