"""Model zoo for adversarial distillation: CIFAR-style networks, ``build_model`` and checkpoint loading.

All networks use a 3x3 stride-1 stem without max-pool and average-pool adaptively before the classifier,
so they accept any input size from 8x8 (digits) through 32x32 (CIFAR) to 64x64 (TinyImageNet); except
``trades_smallcnn``, TRADES' MNIST network (28x28; any input from 16x16: INPUT_SIZES, ``register_model``).
They take inputs in [0, 1] (no normalisation layer), use no in-place activations (input gradients
for attacks stay valid) and work with ``channels_last``.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import nn

from ..errors import UsageError
from ..registry import Registry
from .compact import VGG, MobileNetV2, SmallCNN, TradesSmallCNN
from .resnet import ResNet, preact_resnet18, resnet18, resnet34
from .wideresnet import WideResNet

__all__ = ["MODELS", "INPUT_SIZES", "register_model", "check_input", "build_model", "load_state_dict_into", "ResNet",
           "WideResNet", "MobileNetV2", "VGG", "SmallCNN", "TradesSmallCNN"]

# name -> factory(num_classes, in_channels) -> nn.Module
MODELS: Registry[Callable[[int, int], nn.Module]] = Registry("model")
# name -> the inputs a model accepts: (exact (height, width) sizes or None for any, smallest side); absent: any
# size from 1x1 (the built-ins pool adaptively: 8x8 digits to 64x64 TinyImageNet)
INPUT_SIZES: dict[str, tuple[tuple[tuple[int, int], ...] | None, int]] = {}


def register_model(name: str, factory: Callable[[int, int], nn.Module], *, input_sizes=None,
                   min_side: int | None = None) -> Callable:
    """Register ``factory(num_classes, in_channels) -> nn.Module`` as model ``name`` (usable as a decorator's
    target: returns ``factory``). The inputs it accepts: ``input_sizes``, the image sizes, each a side (32) or a
    (height, width) pair (None: any), and ``min_side``, the smallest side (None: 1). A model given inputs it does
    not accept is refused before a run starts (:func:`check_input`)."""
    sizes = None
    if input_sizes is not None:
        try:
            sizes = tuple((int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1])) for s in input_sizes)
        except (TypeError, ValueError, IndexError):
            raise UsageError(f"model '{name}': input_sizes {input_sizes!r} must be a list of sides (32) or "
                             "(height, width) pairs") from None
    MODELS.add(name, factory)
    if sizes is not None or min_side:
        INPUT_SIZES[name] = (sizes, int(min_side or 1))
    return factory


# the built-ins, registered as a plugin's models are
register_model("resnet18", resnet18)
register_model("resnet34", resnet34)
register_model("preact_resnet18", preact_resnet18)
register_model("wrn34_10", functools.partial(WideResNet, 34, 10))
register_model("wrn34_20", functools.partial(WideResNet, 34, 20))
register_model("wrn70_16", functools.partial(WideResNet, 70, 16))
register_model("mobilenet_v2", MobileNetV2)
register_model("vgg16", functools.partial(VGG, VGG.CFG16))
register_model("small_cnn", SmallCNN)
register_model("trades_smallcnn", TradesSmallCNN, min_side=16)  # TRADES' SmallCNN for MNIST (yaodongyu/TRADES)


def check_input(arch: str, in_shape, what: str = "") -> None:
    """A one-line UsageError when model ``arch`` does not accept images of ``in_shape`` (C, H, W) (INPUT_SIZES)."""
    MODELS.get(arch)
    if in_shape is None:  # a dataset whose shape its options set (synthetic): checked when the model is built
        return
    sizes, side = INPUT_SIZES.get(arch, (None, 1))
    h, w = (int(s) for s in tuple(in_shape)[1:])
    where = f" ({what})" if what else ""
    if sizes is not None and (h, w) not in sizes:
        accepted = ", ".join(f"{a}x{b}" for a, b in sizes)
        raise UsageError(f"model '{arch}' accepts inputs of {accepted}, not {h}x{w}{where}")
    if min(h, w) < side:
        raise UsageError(f"model '{arch}' takes images of at least {side}x{side}, not {h}x{w}{where}; choose another "
                         "architecture, e.g. small_cnn")

# Keys under which training scripts commonly nest the state_dict; prefixes added by DDP and torch.compile.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_KEY_PREFIXES = ("module.", "_orig_mod.")


def build_model(arch: str, num_classes: int, in_shape=(3, 32, 32)) -> nn.Module:
    """Build ``arch`` (a MODELS name) for ``num_classes`` classes and inputs of shape ``in_shape`` = (C, H, W).

    The returned module gives logits; it records ``arch``, ``num_classes`` and ``in_shape`` as attributes.
    """
    factory = MODELS.get(arch)
    if int(num_classes) < 2:
        raise UsageError(f"a classifier needs at least 2 classes, not {num_classes}")
    in_shape = tuple(int(s) for s in in_shape)
    if len(in_shape) != 3 or min(in_shape) < 1:
        raise UsageError(f"input shape must be (channels, height, width), not {in_shape}")
    check_input(arch, in_shape)
    model = factory(int(num_classes), in_shape[0])
    model.arch, model.num_classes, model.in_shape = arch, int(num_classes), in_shape
    return model


def _unwrap(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """Find the state_dict inside ``obj`` and strip DDP / torch.compile key prefixes."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{source} does not hold a state_dict (a mapping of parameter names to tensors)")
    out = {}
    for key, value in obj.items():
        while key.startswith(_KEY_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _names(keys: list[str]) -> str:
    """The first three names and the count, e.g. ``a, b, c, ... (7 in all)``."""
    more = f", ... ({len(keys)} in all)" if len(keys) > 3 else ""
    return ", ".join(keys[:3]) + more


def _shape(t: torch.Tensor) -> str:
    return "[" + ",".join(str(d) for d in t.shape) + "]"


def load_state_dict_into(model: nn.Module, obj: Any, source: str) -> nn.Module:
    """Strictly load the weights in ``obj`` (as read by ``checkpoint.safe_load``) into ``model``.

    Accepts a plain state_dict or one nested under ``state_dict`` / ``model`` / ``model_state_dict``,
    with keys optionally prefixed by ``module.`` (DDP) or ``_orig_mod.`` (torch.compile). Any mismatch
    is a one-line UsageError naming ``source`` and the first offending keys.
    """
    state = _unwrap(obj, source)
    ignored = getattr(model, "IGNORED_KEY_PREFIXES", ())
    state = {k: v for k, v in state.items() if not (ignored and k.startswith(ignored))}
    expected = model.state_dict()
    # BatchNorm fills a missing num_batches_tracked itself (checkpoints older than PyTorch 0.4.1 lack it).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {_shape(state[k])} vs {_shape(v)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{label} {_names(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", shapes)) if keys]
    if problems:
        what = getattr(model, "arch", type(model).__name__)
        classes = getattr(model, "num_classes", None)
        target = f"a {what} with {classes} classes" if classes else f"a {what}"
        raise UsageError(f"{source} does not fit {target}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)
    return model
