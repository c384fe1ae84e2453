"""Switchable speed features for the training step and evaluation; none changes the mathematics.

=====================  ============================================================================
feature (TrainConfig)  what it does
=====================  ============================================================================
``channels_last``      networks' weights (and so their activations) in NHWC memory format: the
                       layout oneDNN (CPU) and cuDNN prefer; the same arithmetic, another layout.
``fold_bn``            attacks on a network in eval() run on a BatchNorm-folded copy of it, rebuilt
                       from the current weights each time an attack starts: every Conv2d followed
                       by an eval-mode BatchNorm2d becomes one convolution with weight
                       ``w * g / sqrt(v + e)`` and bias ``(b - m) * g / sqrt(v + e) + beta`` (the BN
                       becomes an identity). Equal to the eval-mode network up to float rounding;
                       attacks in train() mode (batch statistics: ARD, AKD², IAD) are left alone.
                       Frozen teachers are folded once, when loaded.
``input_grads_only``   the attack differentiates with respect to its input only: the attacked
                       networks' parameters have ``requires_grad`` off for its duration
                       (:func:`raydistill.attacks.frozen_params`; the folded copy never has them on),
                       so autograd neither records nor keeps what weight gradients would need.
``compile``            ``torch.compile``: ``"attack"`` compiles the networks as the attack runs them
                       (the folded copy, or a compiled wrapper of the network), ``"all"`` also the
                       training forward and backward (in place: names and state_dicts unchanged).
                       One graph per variant, none per PGD step or batch: grad mode on (attack) or
                       off, input requiring grad or not, the first batch size and then a dynamic
                       one (a smaller last batch), TF32 on or off (a tf32 run's evaluation); their
                       networks share a forward's code (student and peer, folded copies), so
                       :func:`prepare` raises dynamo's per-code recompile limit to
                       ``RECOMPILE_LIMIT`` (PyTorch's default 8 is reached by PeerAiD with
                       ``compile="all"``, ``fold_bn`` and tf32; beyond it dynamo runs eagerly).
=====================  ============================================================================

Precision policy (``--precision``; :func:`configure_backends`, called once per process where a run
starts, by ``engine.Trainer.setup``):

=========  ===================================================================================
precision  training
=========  ===================================================================================
``fp32``   strict IEEE fp32 (the default): TF32 off for matmuls and convolutions on CUDA
           (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``
           False; PyTorch's own default lets cuDNN convolutions use TF32)
``tf32``   fp32 tensors, TF32 tensor-core arithmetic for CUDA matmuls and convolutions (both
           flags True); training only. On a CPU it is the fp32 arithmetic (the flags are CUDA's).
           An extension of the contract's fp32/bf16: whether it stays a choice depends on a GPU
           measurement of its speed and accuracy against fp32 and bf16, not yet made
``bf16``   the step under bf16 autocast (:func:`autocast`; attack objectives and losses cast
           logits to fp32), TF32 off for whatever stays fp32
=========  ===================================================================================

On CUDA every precision also sets ``torch.backends.cudnn.benchmark = True`` (input shapes are
fixed within a run: the fastest convolution algorithms are chosen once). Evaluation (validation,
the test attacks, ``evaluation.evaluate`` and so the evaluate command) always runs in strict fp32,
whatever ``--precision`` says: :func:`strict_fp32` turns TF32 off for its duration and restores
the flags after (the engine never runs evaluation under autocast). Flipping TF32 is part of
``torch.compile``'s global-state guard: a compiled network used both in a tf32 training step and in
evaluation keeps one compiled graph for each. Thread counts are ``Placement.threads``. Integration points: :func:`prepare` on every network when it is built
(before DDP wraps it), :func:`attack_views` where a method takes its networks for an attack, and
:func:`inference_view` for evaluation forwards. A prepared network carries its settings as a plain
attribute (not in its state_dict); a network that was never prepared runs as it is.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from typing import Iterator

import torch
import torch.fx
from torch import nn

from . import attacks
from .choices import PRECISIONS  # --precision's choices

@dataclasses.dataclass(frozen=True)
class FastPath:
    """The features switched on for one network (see the module docstring)."""

    channels_last: bool = False
    fold_bn: bool = False
    input_grads_only: bool = False
    compile: str = "none"

    @classmethod
    def of(cls, cfg) -> "FastPath":
        """The settings of a TrainConfig (or any object with these attribute names; missing = off)."""
        return cls(**{f.name: getattr(cfg, f.name, f.default) for f in dataclasses.fields(cls)})

    @property
    def active(self) -> bool:
        return self != FastPath()


# ----------------------------------------------------------------------------- BatchNorm folding
def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, bn) submodule names where a BatchNorm2d's only input is a Conv2d's output used nowhere else.

    Found on the ``torch.fx`` graph of the model; each module of a pair must be called once per forward.
    """
    graph = torch.fx.symbolic_trace(model).graph
    mods = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(mods[node.target]) is not nn.BatchNorm2d or len(node.args) != 1:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and type(mods[src.target]) is nn.Conv2d
                and len(src.users) == 1 and calls[src.target] == calls[node.target] == 1
                and mods[node.target].track_running_stats):
            pairs.append((src.target, node.target))
    return pairs


class FoldedCopy:
    """A BatchNorm-folded, eval-mode, gradient-free copy of ``source``; :meth:`refresh` re-reads its weights."""

    def __init__(self, source: nn.Module):
        try:
            pairs = conv_bn_pairs(source)
        except Exception as exc:  # a forward torch.fx cannot trace: the copy is an unfolded one
            warnings.warn(f"fold_bn: cannot trace {type(source).__name__} ({exc}); attacking an unfolded copy")
            pairs = []
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        self.pairs = []
        for conv_name, bn_name in pairs:
            conv = self.module.get_submodule(conv_name)
            if conv.bias is None:
                conv.bias = nn.Parameter(conv.weight.new_zeros(conv.out_channels), requires_grad=False)
            parent, _, attr = bn_name.rpartition(".")
            setattr(self.module.get_submodule(parent), attr, nn.Identity())
            self.pairs.append((source.get_submodule(conv_name), source.get_submodule(bn_name), conv))
        folded = {n for c, b in pairs for n in (c, b)}
        dst = dict(self.module.named_parameters()) | dict(self.module.named_buffers())
        src = dict(source.named_parameters()) | dict(source.named_buffers())
        self.copies = [(dst[k], v) for k, v in src.items() if k.rpartition(".")[0] not in folded]

    @torch.no_grad()
    def refresh(self) -> nn.Module:
        """Copy the source's current weights in (folding each pair); returns the folded module."""
        for dst, src in self.copies:
            dst.copy_(src)
        for conv, bn, fused in self.pairs:
            scale = torch.rsqrt(bn.running_var + bn.eps)
            shift = -bn.running_mean * scale
            if bn.weight is not None:
                scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
            fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
            fused.bias.copy_(shift if conv.bias is None else conv.bias * scale + shift)
        return self.module


# ----------------------------------------------------------------------------- per-network state
class _State:
    """What :func:`prepare` attaches to a network (as the plain attribute ``ATTR``): its settings,
    and, made at first use (so on the device the network was moved to after ``prepare``), its
    folded copy and compiled wrapper. A copy or pickle of the network gets the settings only."""

    def __init__(self, fp: FastPath):
        self.fp = fp
        self._folded: FoldedCopy | None = None
        self._compiled: nn.Module | None = None

    def __reduce__(self):
        return _State, (self.fp,)

    def folded(self, model: nn.Module) -> nn.Module:
        """The folded copy of ``model``, refreshed from its current weights."""
        if self._folded is None:
            self._folded = FoldedCopy(model)
            if self.fp.compile != "none":
                self._folded.module.compile()
        return self._folded.refresh()

    def compiled(self, model: nn.Module) -> nn.Module:
        """``model`` itself, or with ``compile="attack"`` its compiled wrapper."""
        if self.fp.compile != "attack":
            return model
        if self._compiled is None:
            self._compiled = torch.compile(model)
        return self._compiled


ATTR = "_raydistill_fastpath"
RECOMPILE_LIMIT = 16  # compiled graphs per forward's code (see the module docstring's ``compile``)


def prepare(model: nn.Module, cfg, frozen: bool = False) -> nn.Module:
    """Apply ``cfg``'s features to a freshly built network (before DDP wraps it).

    A ``frozen`` network (a teacher: eval mode, never trained) with ``fold_bn`` is returned folded
    once and for all. Returns the network to use in place of ``model``.
    """
    fp = FastPath.of(cfg)
    if not fp.active:
        return model
    if fp.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if frozen and fp.fold_bn:
        model = FoldedCopy(model).refresh()
        fp = dataclasses.replace(fp, fold_bn=False)
    setattr(model, ATTR, _State(fp))
    if fp.compile != "none":
        import torch._dynamo as dynamo  # (bound as dynamo: a plain ``import torch._dynamo`` makes ``torch`` local)

        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    if fp.compile == "all":
        model.compile()
    return model


def views_of(model: nn.Module) -> list[nn.Module]:
    """The other modules that run as ``model``: its folded copy and compiled wrapper, once made."""
    state = getattr(model, ATTR, None)
    if state is None:
        return []
    return [m for m in (state._folded.module if state._folded else None, state._compiled) if m is not None]


def _view(model: nn.Module, stack: contextlib.ExitStack) -> nn.Module:
    state = getattr(model, ATTR, None)
    if state is None:
        return model
    if state.fp.fold_bn and not model.training:
        return state.folded(model)
    if state.fp.input_grads_only:
        stack.enter_context(attacks.frozen_params(model))
    return state.compiled(model)


@contextlib.contextmanager
def attack_views(models: list[nn.Module], bn: str | None = None) -> Iterator[list[nn.Module]]:
    """``models`` in BatchNorm mode ``bn`` ('eval' | 'train'; None: as they are) for an attack, and the
    modules the attack should run in their place.

    In eval mode with ``fold_bn``: the folded copy, refreshed from the current weights; otherwise the
    network itself (its compiled wrapper with ``compile="attack"``), with its parameters frozen for
    the duration when ``input_grads_only``. Unprepared networks are yielded unchanged. Modes and
    ``requires_grad`` flags are restored on exit.
    """
    with contextlib.ExitStack() as stack:
        if bn is not None:
            stack.enter_context(attacks.bn_mode(models, bn))
        yield [_view(m, stack) for m in models]


def inference_view(model: nn.Module) -> nn.Module:
    """The module that computes ``model``'s eval-mode function fastest: its refreshed folded copy
    when it has one, else the model itself. For evaluation (which runs the model in eval mode)."""
    state = getattr(model, ATTR, None)
    return state.folded(model) if state is not None and state.fp.fold_bn else model


# ----------------------------------------------------------------------------- precision


def tf32_flags() -> tuple[bool, bool]:
    """(``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``)."""
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def _set_tf32(matmul: bool, conv: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = conv


def configure_backends(device: torch.device | str, precision: str) -> dict[str, bool]:
    """Apply the precision policy (module docstring) for a run on ``device``: TF32 on for ``"tf32"``,
    off for ``"fp32"`` and ``"bf16"``; on CUDA, ``cudnn.benchmark`` on. Once per process, where a run
    starts (``Trainer.setup``). Returns the flags as set."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    tf32 = precision == "tf32"
    _set_tf32(tf32, tf32)
    if torch.device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    return {"cuda_matmul_allow_tf32": tf32, "cudnn_allow_tf32": tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """TF32 off (matmuls and convolutions) for the duration, the previous flags restored after:
    evaluation runs in strict fp32 whatever the run's ``--precision``."""
    saved = tf32_flags()
    _set_tf32(False, False)
    try:
        yield
    finally:
        _set_tf32(*saved)


def autocast(device: torch.device | str, precision: str):
    """bf16 autocast on ``device`` for ``precision == "bf16"`` (the engine's fast path), else a no-op
    (fp32 and tf32 tensors stay fp32; tf32 is a backend flag, see :func:`configure_backends`)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
