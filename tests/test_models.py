"""Model zoo: every architecture at every input size and class count, key names, checkpoint loading."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from raydistill.errors import UsageError
from raydistill.models import INPUT_SIZES, MODELS, build_model, load_state_dict_into

HEAVY = {"wrn34_20", "wrn70_16"}  # 185M / 267M parameters: seconds per pass on a CPU
# every architecture at every class count; the heavy ones (a pass takes seconds) at the largest head only,
# since the class count changes nothing but the last layer (test_heavy_models_smoke builds them with 10)
CASES = [pytest.param(a, n, marks=pytest.mark.slow) if a in HEAVY else (a, n)
         for a in MODELS.names() for n in ((200,) if a in HEAVY else (10, 100, 200))]


def test_registry_names():
    assert set(MODELS.names()) == {"resnet18", "resnet34", "preact_resnet18", "wrn34_10", "wrn34_20", "wrn70_16",
                                   "mobilenet_v2", "vgg16", "small_cnn", "trades_smallcnn"}


def sizes(arch):
    """8x8 (or the architecture's smallest side, if larger: trades_smallcnn's 16), 32x32 and 64x64."""
    return [max(8, INPUT_SIZES.get(arch, (None, 1))[1]), 32, 64]


@pytest.mark.parametrize("arch,num_classes", CASES)
def test_forward_backward_all_sizes(arch, num_classes):
    torch.manual_seed(0)
    model = build_model(arch, num_classes, (3, 32, 32)).train()
    if arch == "trades_smallcnn":  # TRADES' initialisation zeroes the last layer: no input gradient until it trains
        torch.nn.init.normal_(model.classifier.fc3.weight)
    for size in sizes(arch):
        x = torch.rand(2, 3, size, size, requires_grad=True)
        logits = model(x)
        assert logits.shape == (2, num_classes)
        F.cross_entropy(logits, torch.tensor([0, 1])).backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", sorted(HEAVY))
def test_heavy_models_smoke(arch):
    """The fast suite still builds the big WideResNets once (small input)."""
    model = build_model(arch, 10)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("arch", sorted(set(MODELS.names()) - HEAVY))
def test_single_channel_input_and_eval(arch):
    side = sizes(arch)[0]
    model = build_model(arch, 10, (1, side, side)).eval()
    with torch.no_grad():
        assert model(torch.rand(3, 1, side, side)).shape == (3, 10)


@pytest.mark.parametrize("arch", ["resnet18", "preact_resnet18", "wrn34_10", "mobilenet_v2", "vgg16", "small_cnn",
                                  "trades_smallcnn"])
def test_channels_last_matches_and_keeps_input_gradients(arch):
    torch.manual_seed(0)
    model = build_model(arch, 10).eval()
    x = torch.rand(2, 3, 16, 16)
    ref = model(x)
    xcl = x.clone().to(memory_format=torch.channels_last).requires_grad_(True)
    out = model.to(memory_format=torch.channels_last)(xcl)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert torch.isfinite(xcl.grad).all()


def test_build_records_identity_and_rejects_bad_input():
    model = build_model("small_cnn", 7, (1, 8, 8))
    assert (model.arch, model.num_classes, model.in_shape) == ("small_cnn", 7, (1, 8, 8))
    with pytest.raises(UsageError, match="unknown model 'resnet50'; choose from: resnet18"):
        build_model("resnet50", 10)
    with pytest.raises(UsageError, match="at least 2 classes"):
        build_model("small_cnn", 1)


def test_public_checkpoint_key_names():
    wrn = build_model("wrn34_10", 10).state_dict()
    for key in ("conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.conv1.weight", "block1.layer.0.bn2.weight",
                "block1.layer.0.conv2.weight", "block1.layer.0.convShortcut.weight", "block1.layer.4.conv2.weight",
                "block3.layer.4.bn2.running_var", "bn1.weight", "fc.bias"):
        assert key in wrn, key
    assert "block1.layer.5.conv1.weight" not in wrn and "block1.layer.1.convShortcut.weight" not in wrn
    assert wrn["fc.weight"].shape == (10, 640)
    resnet = build_model("resnet18", 10).state_dict()
    for key in ("conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
                "layer2.0.shortcut.1.running_mean", "layer4.1.bn2.weight", "linear.weight"):
        assert key in resnet, key
    assert "layer1.0.shortcut.0.weight" not in resnet
    preact = build_model("preact_resnet18", 10).state_dict()
    for key in ("conv1.weight", "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer2.0.shortcut.0.weight",
                "bn.weight", "linear.weight"):
        assert key in preact, key
    assert "bn1.weight" not in preact


def test_trades_smallcnn_is_trades_network_with_its_parameter_names():
    """TRADES' models/small_cnn.py, key by key and shape by shape (its checkpoints load as they are); at 28x28
    the 4x4 pooling is the identity, so the function is TRADES' forward (features.view(-1, 64*4*4) -> classifier);
    smaller than 16x16 is one line."""
    torch.manual_seed(0)
    model = build_model("trades_smallcnn", 10, (1, 28, 28)).eval()
    expected = {"feature_extractor.conv1.weight": (32, 1, 3, 3), "feature_extractor.conv1.bias": (32,),
                "feature_extractor.conv2.weight": (32, 32, 3, 3), "feature_extractor.conv2.bias": (32,),
                "feature_extractor.conv3.weight": (64, 32, 3, 3), "feature_extractor.conv3.bias": (64,),
                "feature_extractor.conv4.weight": (64, 64, 3, 3), "feature_extractor.conv4.bias": (64,),
                "classifier.fc1.weight": (200, 1024), "classifier.fc1.bias": (200,),
                "classifier.fc2.weight": (200, 200), "classifier.fc2.bias": (200,),
                "classifier.fc3.weight": (10, 200), "classifier.fc3.bias": (10,)}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert not model.classifier.fc3.weight.any() and isinstance(model.classifier.drop, torch.nn.Dropout)
    torch.nn.init.normal_(model.classifier.fc3.weight)  # TRADES' zero last layer would make every output 0
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        trades = model.classifier(model.feature_extractor(x).view(-1, 64 * 4 * 4))
        torch.testing.assert_close(model(x), trades)
    with pytest.raises(UsageError, match="model 'trades_smallcnn' takes images of at least 16x16, not 8x8"):
        build_model("trades_smallcnn", 10, (1, 8, 8))


def _same_outputs(a, b):
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x), b.eval()(x))


@pytest.mark.parametrize("wrap", [
    lambda sd: sd,
    lambda sd: {"state_dict": sd, "epoch": 3},
    lambda sd: {"model": sd},
    lambda sd: {"model_state_dict": sd, "optimizer": {}},
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {"state_dict": {"module._orig_mod." + k: v for k, v in sd.items()}},
], ids=["plain", "state_dict", "model", "model_state_dict", "ddp", "ddp+compile"])
def test_load_state_dict_variants(wrap):
    torch.manual_seed(0)
    source = build_model("resnet18", 10)
    for p in source.parameters():  # make it differ from a fresh init
        p.data.add_(0.01)
    target = build_model("resnet18", 10)
    load_state_dict_into(target, wrap(source.state_dict()), source="teacher.pt")
    _same_outputs(source, target)


def test_trades_unused_sub_block_and_old_batchnorm_keys_are_tolerated():
    torch.manual_seed(0)
    source = build_model("wrn34_10", 10)
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["sub_block1.layer.0.conv1.weight"] = torch.zeros(160, 16, 3, 3)
    target = build_model("wrn34_10", 10)
    load_state_dict_into(target, sd, source="trades.pt")
    _same_outputs(source, target)


def test_wrong_class_count_is_one_line():
    sd = build_model("resnet18", 100).state_dict()
    with pytest.raises(UsageError) as err:
        load_state_dict_into(build_model("resnet18", 10), sd, source="t.pt")
    msg = str(err.value)
    assert "\n" not in msg
    assert msg == ("t.pt does not fit a resnet18 with 10 classes: shape mismatch "
                   "linear.weight [100,512] vs [10,512], linear.bias [100] vs [10]")


def test_wrong_architecture_is_one_short_line():
    sd = build_model("preact_resnet18", 10).state_dict()
    with pytest.raises(UsageError) as err:
        load_state_dict_into(build_model("resnet18", 10), sd, source="t.pt")
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    assert msg.startswith("t.pt does not fit a resnet18 with 10 classes: missing keys bn1.weight, bn1.bias, ")
    assert "in all); unexpected keys bn.weight, bn.bias, " in msg


@pytest.mark.parametrize("obj", [{"epoch": 1}, [1, 2], {}, {"state_dict": {"w": 1}}])
def test_not_a_state_dict(obj):
    with pytest.raises(UsageError, match="t.pt does not hold a state_dict"):
        load_state_dict_into(build_model("small_cnn", 10), obj, source="t.pt")


@pytest.mark.slow  # trains (a few seconds on an idle CPU)
def test_small_cnn_learns_digits_fast():
    """The quick network reaches >95% clean test accuracy on 8x8 digits in a few CPU seconds."""
    from raydistill.data import iterate_batches, load_dataset, to_float

    torch.manual_seed(0)
    ds = load_dataset("digits")
    model = build_model("small_cnn", ds.num_classes, ds.in_shape)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(5):
        model.train()
        for xb, yb in iterate_batches(ds.train_x, ds.train_y, 64, shuffle=True, seed=0, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
    with torch.no_grad():
        acc = (model.eval()(to_float(ds.test_x)).argmax(1) == ds.test_y).float().mean().item()
    assert acc > 0.95
