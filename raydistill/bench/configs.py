"""One bench invocation's configs and step runners (teachers and run folders in its work folder)."""
from __future__ import annotations

import argparse
import dataclasses
import itertools
from pathlib import Path

from .. import fastpath
from ..config import TrainConfig, resolve
from ..plugin_checks import check_config
from ..steprunner import StepRunner


class Bench:
    """Builds the configs and step runners of one bench invocation (teachers and runs in ``workdir``)."""

    def __init__(self, args: argparse.Namespace, workdir: str):
        from ..data import load_dataset

        self.args, self.workdir = args, Path(workdir)
        self.options = ({"shape": (3, args.image_size, args.image_size), "num_classes": args.num_classes,
                         "n_train": args.batch_size * max(args.steps, 4) + 2 * args.num_classes,
                         "n_test": args.eval_examples} if args.dataset == "synthetic" else {})
        d = load_dataset(args.dataset, data_dir=args.data_dir, val_size=0, train_size=args.train_size, **self.options)
        self.num_classes, self.in_shape = d.num_classes, d.in_shape
        self._teachers: dict[str, str] = {}
        self._runs = itertools.count()

    def teacher(self, role: str) -> str:
        """A random-init checkpoint of the student's architecture (offline methods' --teacher)."""
        from ..checkpoint import save_model
        from ..models import build_model

        if role not in self._teachers:
            model = build_model(self.args.student, self.num_classes, self.in_shape)
            self._teachers[role] = str(save_model(self.workdir / role, model, self.args.student, self.num_classes,
                                                  self.in_shape, {"note": "random init, for benchmarking"}))
        return self._teachers[role]

    def config(self, method: str, **changes) -> TrainConfig:
        """The method's config for this benchmark: the bench's one way to a config. ``changes``
        override fields last (speed features, precision, threads; a Ray-overhead run's epochs,
        workers, name...)."""
        from ..methods import get_method
        from ..methods._teachers import OfflineMethod

        a, cls = self.args, get_method(method)
        hp = {"warmup": "0"} if "warmup" in cls.hparams else {}
        hp.update({k: v for k, v in a.hp.items() if k in cls.hparams})
        offline = issubclass(cls, OfflineMethod)
        flags = dict(dataset=a.dataset, data_dir=a.data_dir, train_size=a.train_size, student=a.student, peer=a.peer, val_size=0,
                     batch_size=a.batch_size, precision=a.precision, attack_steps=a.attack_steps, seed=a.seed,
                     teacher=self.teacher("teacher") if offline else None,
                     natural_teacher=self.teacher("teacher_nat") if offline and cls.uses_natural_teacher else None,
                     workers=0, storage_path=str(self.workdir / "runs"), name=f"bench-{method}",
                     **{f.name: getattr(a, f.name) for f in dataclasses.fields(fastpath.FastPath)})
        flags.update({k: v for k, v in changes.items() if k not in ("in_process", "threads")})
        cfg = resolve(method, {k: v for k, v in flags.items() if v is not None}, hp)
        place = {k: changes[k] for k in ("in_process", "threads") if k in changes}
        cfg = dataclasses.replace(cfg, dataset_options=dict(self.options),
                                  placement=dataclasses.replace(cfg.placement, **{"threads": a.threads, **place}))
        check_config(cfg)  # a plugin's model and method on 2 images: one error line before anything is timed
        return cfg

    def runner(self, cfg: TrainConfig) -> StepRunner:
        """An in-process run of ``cfg``, set up, in a folder of its own."""
        return StepRunner(cfg, self.workdir / "runs" / f"{cfg.method}-{next(self._runs)}")
