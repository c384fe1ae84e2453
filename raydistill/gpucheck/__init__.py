"""``python -m raydistill.gpucheck`` (``make gpu-check``): the GPU smoke check and figures, in one command.

Made for a bare GPU machine that has PyTorch (torchvision, numpy, scikit-learn, PyYAML, pyarrow) but
no Ray, MLflow, Optuna or pyautoattack and no internet: everything runs in-process
(``--workers 0``) with tracking off (``--tracking-uri none``). Wheels it needs that the machine may lack
(pytest and its pure-Python dependencies; ``scripts/fetch-gpu-wheels.sh`` fetches them into ``.whl/``)
are installed with ``--no-deps`` into a target folder, never into the interpreter's environment, and
raydistill itself is installed there without dependencies (``pip install --no-deps
--no-build-isolation --target``); the checkout stays first on the path, so its source is what runs.

Parts, in this order, each a subprocess with its own time budget (a part that runs over is killed
and recorded as ``timeout``, with whatever it measured before):

1. ``pytest_gpu``: ``pytest -m gpu`` over the test files that mark tests ``gpu``;
2. ``train``: a 2-epoch in-process ``train peeraid`` (synthetic 32x32, resnet18), its final figures;
3. ``pgd20_check``: ``bench --pgd20-check`` on that checkpoint: PGD-20 accuracy in fp32 vs the fast path;
   ``authors_peeraid``: ``bench --compare-authors-peeraid`` (resnet18, batch 128): our PeerAiD step in
   strict fp32 and on the fast path against the authors'-code step (from the checkout's benchmarks/);
4. ``realdata:{train,eval,aa}:{pgd_at,peeraid}``: the real-data leg (``gpucheck.realdata``): PGD-AT and
   PeerAiD trained in-process on the full Fashion-MNIST training set (trades_smallcnn; 3 and 2 epochs), clean
   and PGD-20 on the 10,000 test images, AutoAttack on the first 1,000; the IDX files travel with the checkout
   (``make gpu-data``: ``data/FashionMNIST/raw``), AutoAttack needs pyautoattack's wheel;
5. ``bench:ARCH:PRECISION``: ``bench`` on synthetic 32x32 data for pgd_at, trades, peeraid, adaad and
   at_aka with resnet18 and wrn34_10 (batch 128) in fp32, tf32 (when the option table has it), bf16,
   and bf16 with ``--compile all`` (the compiled runs last: they are the slowest to start); each row
   with its FLOPs per step and the share of the GPU's bf16 peak (``BF16_PEAK_TFLOPS``) it reaches.

Without CUDA the GPU parts (2-5) are recorded as skipped, with the reason, and the check takes
seconds; pytest still runs its selection (whose tests skip without CUDA).

``gpu-check.json`` and ``gpu-check.md`` are written to ``--out`` (default ``$GPU_CHECK_OUT``, else
``./gpu-check``) after every part, atomically: a check cut off still leaves what it measured.
The whole check keeps to ``--budget`` seconds (default ``$GPU_CHECK_BUDGET_S``, else 480).
"""
from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
METHODS = ("pgd_at", "trades", "peeraid", "adaad", "at_aka")
ARCHS = ("resnet18", "wrn34_10")
BATCH = 128
BENCH_STEPS, BENCH_WARMUP = 5, 2
TRAIN = dict(method="peeraid", dataset="synthetic", student="resnet18", epochs=2)
# part budgets (s); each part also stops at the check's overall deadline
PYTEST_BUDGET, TRAIN_BUDGET, PGD20_BUDGET, AUTHORS_BUDGET = 60, 80, 40, 45
BENCH_BUDGET = {"resnet18": 20, "wrn34_10": 35}  # per precision; compiled runs get COMPILE_BUDGET
COMPILE_BUDGET = 45
BF16_PEAK_TFLOPS = 790.0  # the H200's dense bf16 peak as measured on the device machine (device README)
RESERVE = 5  # seconds kept back at the end for the last write
# the real-data leg (gpucheck.realdata): epochs per method on the full training set, test images, budgets (s) per
# part; estimated, not measured (no GPU has run it yet): an epoch of 59,000 images of PGD-10 on trades_smallcnn at
# batch 128 is ~460 steps of 11 small passes
REALDATA = dict(student="trades_smallcnn", epochs={"pgd_at": 3, "peeraid": 2}, test_examples=10000, aa_examples=1000)
REALDATA_BUDGET = {"train": 60, "eval": 20, "aa": 45}

PROBE = r"""
import json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
try:
    import torch
    out["torch"] = torch.__version__
    out["cuda_available"] = bool(torch.cuda.is_available())
    out["torch_cuda"] = torch.version.cuda
    if out["cuda_available"]:
        out["gpu_name"] = torch.cuda.get_device_name(0)
        out["gpu_count"] = torch.cuda.device_count()
        out["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as exc:
    out["torch_error"] = f"{type(exc).__name__}: {exc}"
try:
    from raydistill.config import EXPERIMENT_FIELDS
    out["precisions"] = list(EXPERIMENT_FIELDS["precision"].metadata["choices"])
    out["compile_modes"] = list(EXPERIMENT_FIELDS["compile"].metadata["choices"])
    import raydistill
    out["raydistill_path"] = str(raydistill.__path__[0])
except Exception as exc:
    out["raydistill_error"] = f"{type(exc).__name__}: {exc}"
try:  # where the real-data leg finds Fashion-MNIST (GPU_CHECK_DATA, else ./data, else Debian's folder)
    import os
    from pathlib import Path
    from raydistill import mnist
    data = Path(os.environ.get("GPU_CHECK_DATA") or "data").resolve()
    out["fashion_mnist"] = next((str(c) for c in mnist.candidates(mnist.RELEASES["fashion_mnist"], data)
                                 if mnist.complete(c)), None)
    out["fashion_mnist_error"] = None if out["fashion_mnist"] else f"none in {data} or {mnist.DEBIAN_FASHION}"
except Exception as exc:
    out["fashion_mnist_error"] = f"{type(exc).__name__}: {exc}"
import importlib.util
out["have"] = {m: importlib.util.find_spec(m) is not None
               for m in ("pytest", "pytest_timeout", "ray", "mlflow", "optuna", "pyautoattack", "matplotlib")}
print("PROBE " + json.dumps(out))
"""
