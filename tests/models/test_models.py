"""Architectures by name: shapes, parameter counts, norm layers, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from kd_ray.models.archs import ARCHS, build_model, check_arch, count_parameters

SIGNAL = (1, 40)  # mnist1d
DIGITS = (1, 8, 8)
MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)

# The standard CIFAR ResNet-20 (post-activation, parameter-free shortcuts) with 10 classes.
RESNET20_REFERENCE = 272_474


def _has(model: nn.Module, kind: type[nn.Module]) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    return [m for m in model.modules() if isinstance(m, kinds)]


def test_arch_names() -> None:
    assert ARCHS == ("mlp", "conv1d", "smallcnn", "lenet5", "vgg16", "preresnet")


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("mlp", SIGNAL),
        ("mlp", DIGITS),
        ("mlp", CIFAR),
        ("conv1d", SIGNAL),
        ("conv1d", (3, 64)),
        ("smallcnn", DIGITS),
        ("smallcnn", CIFAR),
        ("lenet5", MNIST),
        ("lenet5", CIFAR),
        ("lenet5", (3, 40, 36)),
        ("vgg16", CIFAR),
        ("preresnet8", DIGITS),
        ("preresnet20", CIFAR),
        ("preresnet20-w2", DIGITS),
        ("preresnet47", DIGITS),
    ],
)
def test_output_shape(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(name, shape, num_classes=7)
    out = model(torch.rand(3, *shape))
    assert out.shape == (3, 7)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_preresnet20_parameter_count() -> None:
    count = count_parameters(build_model("preresnet20", CIFAR, 10))
    assert count == 272_282
    assert abs(count - RESNET20_REFERENCE) / RESNET20_REFERENCE < 0.05


def test_preresnet56_uses_bottlenecks() -> None:
    r56 = build_model("preresnet56", CIFAR, 10)
    r20 = build_model("preresnet20", CIFAR, 10)
    assert any(type(m).__name__ == "_PreActBottleneck" for m in r56.modules())
    assert not any(type(m).__name__ == "_PreActBottleneck" for m in r20.modules())
    assert len(r56.layer1) == 6 and len(r20.layer1) == 3
    assert count_parameters(r56) == 590_426
    assert count_parameters(r56) > count_parameters(r20)
    # Bottleneck stages end at 4 x 64 channels.
    assert r56.fc.in_features == 256


def test_width_multiplies_parameters_by_about_four() -> None:
    w1 = count_parameters(build_model("preresnet20", CIFAR, 10))
    w2 = count_parameters(build_model("preresnet20-w2", CIFAR, 10))
    assert 3.8 < w2 / w1 < 4.1


def _reference_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``mlp`` as it was first written (two hidden layers of 256, BatchNorm): stored teachers hold its weights."""
    features = int(np.prod(input_shape))
    return nn.Sequential(
        nn.Flatten(), nn.Linear(features, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(inplace=True),
        nn.Linear(256, 256, bias=False), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Linear(256, num_classes),
    )


@pytest.mark.parametrize("name", ["mlp", "mlp2", "mlp2-w1"])
def test_mlp_builds_exactly_as_before(name: str) -> None:
    torch.manual_seed(3)
    reference = _reference_mlp(SIGNAL, 10).state_dict()
    torch.manual_seed(3)
    built = build_model(name, SIGNAL, 10).state_dict()
    assert list(built) == list(reference)  # same layer names: stored teachers load into it
    assert all(torch.equal(built[k], reference[k]) for k in reference)  # and the same seeded draws


def _mlp_count(depth: int, hidden: int, features: int = 40, classes: int = 10) -> int:
    # Bias-free hidden linears (BatchNorm shifts), each followed by BatchNorm's weight and bias.
    hidden_layers = features * hidden + (depth - 1) * hidden * hidden + depth * 2 * hidden
    return hidden_layers + hidden * classes + classes


@pytest.mark.parametrize(("name", "depth", "hidden"),
                         [("mlp1", 1, 256), ("mlp4", 4, 256), ("mlp2-w0.5", 2, 128), ("mlp2-w2", 2, 512),
                          ("mlp4-w2", 4, 512), ("mlp1-w0.25", 1, 64)])
def test_mlp_depth_and_width(name: str, depth: int, hidden: int) -> None:
    model = build_model(name, SIGNAL, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == depth + 1  # D hidden layers and the classifier
    assert all(m.out_features == hidden for m in linears[:-1])
    assert count_parameters(model) == _mlp_count(depth, hidden)
    assert model(torch.rand(3, *SIGNAL)).shape == (3, 10)
    group = build_model(name, DIGITS, 10, norm="group")
    assert [m.num_channels for m in group.modules() if isinstance(m, nn.GroupNorm)] == [hidden] * depth


def test_mlp_parameters_scale_with_depth_and_width() -> None:
    count = {name: count_parameters(build_model(name, SIGNAL, 10)) for name in ("mlp", "mlp4", "mlp2-w2", "mlp8")}
    # Each added hidden layer adds one hidden x hidden matrix and its norm.
    assert count["mlp8"] - count["mlp4"] == 4 * (256 * 256 + 2 * 256) == 2 * (count["mlp4"] - count["mlp"])
    # Doubling the width doubles the input and output layers and quadruples the hidden-to-hidden one.
    assert count["mlp2-w2"] == _mlp_count(2, 512) and 3.5 < count["mlp2-w2"] / count["mlp"] < 4


@pytest.mark.parametrize(("name", "message"), [
    ("mlp0", r"'mlp0' .*needs D >= 1 hidden layers.*got D=0, K=1"),
    ("mlp2-w0", r"'mlp2-w0' .*256\*K a whole number >= 1.*got D=2, K=0"),
    ("mlp2-w0.001", r"'mlp2-w0.001' .*a whole number.*K=0.001"),
    ("mlp2-w0.3", r"'mlp2-w0.3' .*a whole number"),  # 76.8 units
    ("mlp-w2", r"unknown arch 'mlp-w2'.*did you mean 'mlp2-w2'.*mlp<D>\[-w<K>\]"),
])
def test_bad_mlp_names(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_arch(name, SIGNAL)
    with pytest.raises(ValueError, match=message):
        build_model(name, SIGNAL, 10)


def test_lenet5_pads_28_to_native_32() -> None:
    # Padding 2 turns 28x28 into 32x32, so the classifier sees the same 16x5x5 features.
    assert count_parameters(build_model("lenet5", MNIST, 10)) == 61_706
    assert count_parameters(build_model("lenet5", (1, 32, 32), 10)) == 61_706


@pytest.mark.parametrize(
    ("name", "shape"),
    [("mlp", SIGNAL), ("conv1d", SIGNAL), ("smallcnn", DIGITS), ("preresnet20", DIGITS),
     ("preresnet47", DIGITS)],
)
def test_norm_choice(name: str, shape: tuple[int, ...]) -> None:
    batch = build_model(name, shape, 10, norm="batch")
    assert _has(batch, nn.BatchNorm1d) or _has(batch, nn.BatchNorm2d)
    assert not _has(batch, nn.GroupNorm)

    group = build_model(name, shape, 10, norm="group")
    group_norms = [m for m in group.modules() if isinstance(m, nn.GroupNorm)]
    assert group_norms
    assert all(m.num_groups == 1 for m in group_norms)
    assert not _has(group, nn.BatchNorm1d) and not _has(group, nn.BatchNorm2d)
    # The same positions hold a norm layer, with the same channel counts.
    assert [m.num_channels for m in group_norms] == [m.num_features for m in _norm_layers(batch)]

    none = build_model(name, shape, 10, norm="none")
    assert _norm_layers(none) == []


@pytest.mark.parametrize(("name", "shape"), [("lenet5", MNIST), ("vgg16", CIFAR)])
@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_archs_without_norm_layers_ignore_norm(
    name: str, shape: tuple[int, ...], norm: str
) -> None:
    assert _norm_layers(build_model(name, shape, 10, norm=norm)) == []


def test_group_norm_output_does_not_depend_on_the_batch() -> None:
    # What weight interpolation relies on: in train mode each sample's output is its own.
    torch.manual_seed(0)
    model = build_model("preresnet8", DIGITS, 10, norm="group").train()
    x = torch.rand(4, *DIGITS)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_image_models_rescale_input_and_signal_models_do_not() -> None:
    def scales(model: nn.Module) -> bool:
        return any(type(m).__name__ == "_ImageScale" for m in model.modules())

    for name, shape in [("smallcnn", DIGITS), ("lenet5", MNIST), ("preresnet8", DIGITS),
                        ("mlp", DIGITS)]:
        assert scales(build_model(name, shape, 10)), name
    assert scales(build_model("vgg16", CIFAR, 10))
    assert not scales(build_model("conv1d", SIGNAL, 10))
    assert not scales(build_model("mlp", SIGNAL, 10))

    # The rescale is x -> (x - 0.5) / 0.5: feeding 0.5 everywhere equals feeding zeros to the rest.
    torch.manual_seed(0)
    model = build_model("smallcnn", DIGITS, 10, norm="none").eval()
    rest = model[1:]
    torch.testing.assert_close(model(torch.full((2, *DIGITS), 0.5)), rest(torch.zeros(2, *DIGITS)))


@pytest.mark.parametrize("depth", [8, 14, 20, 26, 32, 38, 47, 56, 110, 164])
def test_valid_preresnet_depths(depth: int) -> None:
    check_arch(f"preresnet{depth}", CIFAR)
    check_arch(f"preresnet{depth}-w4", CIFAR)


@pytest.mark.parametrize("depth", [2, 21, 44, 50, 100])
def test_bad_preresnet_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"preresnet depth {depth} is not valid.*20.*56"):
        check_arch(f"preresnet{depth}", CIFAR)


def test_unknown_name_suggests_preresnet() -> None:
    with pytest.raises(ValueError, match=r"unknown arch 'resnet20'.*did you mean 'preresnet20'"):
        check_arch("resnet20", CIFAR)
    with pytest.raises(ValueError, match=r"mlp, conv1d, smallcnn, lenet5, vgg16, preresnet"):
        check_arch("transformer", CIFAR)
    with pytest.raises(ValueError, match=r"'preresnet' .* needs a depth"):
        check_arch("preresnet", CIFAR)
    with pytest.raises(ValueError, match=r"preresnet width"):
        check_arch("preresnet20-w0", CIFAR)


def test_dimensionality_mismatch() -> None:
    with pytest.raises(ValueError, match=r"'conv1d' takes 1-D signals.*\(3, 32, 32\)"):
        check_arch("conv1d", CIFAR)
    with pytest.raises(ValueError, match=r"'smallcnn' takes images.*\(1, 40\)"):
        check_arch("smallcnn", SIGNAL)
    with pytest.raises(ValueError, match=r"'preresnet20' takes images"):
        check_arch("preresnet20", SIGNAL)


def test_images_too_small() -> None:
    with pytest.raises(ValueError, match=r"'lenet5' needs images with H, W >= 28.*\(1, 8, 8\)"):
        check_arch("lenet5", DIGITS)
    with pytest.raises(ValueError, match=r"'vgg16' needs images with H, W >= 32.*\(1, 28, 28\)"):
        check_arch("vgg16", MNIST)
    with pytest.raises(ValueError, match=r"'smallcnn' needs images with H, W >= 8"):
        check_arch("smallcnn", (1, 4, 4))


def test_unknown_norm_and_bad_shape() -> None:
    with pytest.raises(ValueError, match=r"unknown norm 'layer'.*batch, group, none"):
        check_arch("conv1d", SIGNAL, norm="layer")
    with pytest.raises(ValueError, match=r"input shape"):
        check_arch("mlp", ())
    with pytest.raises(ValueError, match=r"num_classes"):
        build_model("mlp", SIGNAL, 0)


def test_build_model_checks_first() -> None:
    with pytest.raises(ValueError, match=r"preresnet depth 21"):
        build_model("preresnet21", CIFAR, 10)


@pytest.mark.parametrize(("name", "shape"), [("preresnet20", CIFAR), ("vgg16", CIFAR),
                                             ("conv1d", SIGNAL)])
def test_seeded_construction_is_deterministic(name: str, shape: tuple[int, ...]) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name, shape, 10).state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_count_parameters() -> None:
    model = nn.Linear(4, 3)
    assert count_parameters(model) == 15
    # BatchNorm running statistics are buffers, not parameters.
    assert count_parameters(nn.BatchNorm1d(5)) == 10
