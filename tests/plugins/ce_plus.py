"""The tests' plugin (a single file): the method ``ce_plus`` (PGD-AT's adversarial cross-entropy plus a
weighted clean one) with its search space ``ce_plus.yaml``, and the model ``tiny_mlp`` (8x8 inputs only).

With ``CE_PLUS_TRACE`` set to a folder, each process that trains with it leaves a file there named by its Ray
node and process id (``<node id>-<pid>``, ``local-<pid>`` outside Ray): the tests' proof of where it ran.
"""
from __future__ import annotations

import os

from torch import nn

from raydistill.extend import WEIGHT, Method, attack_hparams, attacks, losses, register_model


def _trace() -> None:
    folder = os.environ.get("CE_PLUS_TRACE")
    if not folder:
        return
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{node}-{os.getpid()}"), "w") as f:
        f.write(__file__ + "\n")


class CEPlus(Method):
    """min CE(S(x*), y) + beta * CE(S(x), y), x* = PGD on CE(S(x'), y)."""

    name = "ce_plus"
    hparams = {"beta": 0.5, **attack_hparams(bn_mode="eval", random_start="uniform")}
    ranges = {"beta": WEIGHT}
    search_space = "ce_plus.yaml"
    traced = False

    def inner_max(self, nets, x, y, ctx):
        with self.attacking(nets, ["student"], ctx.hp.bn_mode) as (s,):
            return {"x_adv": self.pgd(attacks.ce_loss(s, y), x, ctx, ctx.hp.random_start)}

    def outer_min(self, nets, x, y, adv, ctx):
        if not CEPlus.traced:
            CEPlus.traced = True
            _trace()
        return {"adv": losses.ce(nets.student(adv["x_adv"]), y),
                "clean": ctx.hp.beta * losses.ce(nets.student(x), y)}


def tiny_mlp(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 64, 32), nn.ReLU(), nn.Linear(32, num_classes))


register_model("tiny_mlp", tiny_mlp, input_sizes=[8])
