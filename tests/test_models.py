"""Tests for sparseham.models: parameter counts, shapes, adaptation, init and errors."""

import math

import pytest
import torch
from torch import nn

from sparseham.models import MODELS, build_model


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "shape", "count"),
    [
        ("lenet300", (1, 28), 266_610),
        ("lenet5", (1, 28), 431_080),
        # 269,722 as in He et al.'s option A, plus 2,752 in the two 1x1 conv + BN shortcuts.
        ("resnet20", (3, 32), 272_474),
        ("resnet32", (3, 32), 466_906),
        ("resnet56", (3, 32), 855_770),
        ("resnet18_cifar", (3, 32), 11_173_962),
        ("wrn22_2", (3, 32), 1_079_642),
        ("vgg16", (3, 32), 14_724_042),
    ],
)
def test_parameter_counts(name, shape, count):
    channels, size = shape
    model = build_model(name, num_classes=10, in_channels=channels, image_size=size)
    assert _params(model) == count


@pytest.mark.parametrize("name", [*MODELS, "torchvision:resnet18"])
@pytest.mark.parametrize(("channels", "size", "classes"), [(1, 28, 10), (3, 32, 100)])
def test_output_shape_adapts_to_input(name, channels, size, classes):
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, in_channels=channels, image_size=size)
    out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


def test_torchvision_first_conv_takes_in_channels():
    model = build_model("torchvision:resnet18", num_classes=7, in_channels=1, image_size=28)
    assert model.conv1.in_channels == 1
    assert (model.conv1.out_channels, model.conv1.kernel_size, model.conv1.stride) == (
        64, (7, 7), (2, 2))
    assert model.fc.out_features == 7


@pytest.mark.parametrize(("size", "pools"), [(32, 5), (28, 4), (16, 4)])
def test_vgg16_drops_pools_that_would_empty_the_map(size, pools):
    model = build_model("vgg16", num_classes=10, in_channels=3, image_size=size)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == pools
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13


def test_resnet_depths_and_option_b_shortcuts():
    for name, depth in (("resnet20", 20), ("resnet32", 32), ("resnet56", 56)):
        model = build_model(name, num_classes=10, in_channels=3, image_size=32)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        one_by_one = [m for m in convs if m.kernel_size == (1, 1)]
        # 6n+2 weighted layers (convs 3x3 plus the final Linear); two 1x1 shortcut convs.
        assert len(convs) - len(one_by_one) + 1 == depth
        assert [(m.in_channels, m.out_channels, m.stride) for m in one_by_one] == [
            (16, 32, (2, 2)), (32, 64, (2, 2))]


@pytest.mark.parametrize("name", ["resnet20", "resnet18_cifar", "wrn22_2", "vgg16"])
def test_convs_before_batchnorm_have_no_bias(name):
    model = build_model(name, num_classes=10, in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)


def test_kaiming_normal_fan_out_init():
    torch.manual_seed(0)
    model = build_model("vgg16", num_classes=10, in_channels=3, image_size=32)
    last = [m for m in model.modules() if isinstance(m, nn.Conv2d)][-1]
    expected = math.sqrt(2 / (last.out_channels * 9))
    assert last.weight.std().item() == pytest.approx(expected, rel=0.02)
    assert last.weight.mean().abs().item() < 0.05 * expected


def test_lenet5_flatten_size_follows_image_size():
    model = build_model("lenet5", num_classes=10, in_channels=3, image_size=32)
    assert model[7].in_features == 50 * 5 * 5
    model = build_model("lenet5", num_classes=10, in_channels=1, image_size=16)
    assert model[7].in_features == 50
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("lenet6", {}, r"unknown model 'lenet6'; choose one of lenet300, lenet5, .*vgg16, "
                       r"or torchvision:<name>"),
        ("torchvision:resnet7", {}, r"unknown torchvision model 'resnet7'; see "
                                    r"torchvision\.models\.list_models\(\)"),
        ("lenet5", {"image_size": 12}, r"lenet5 needs image_size >= 16, got 12"),
        ("resnet20", {"num_classes": 0}, r"build_model num_classes=0; expected an int >= 1"),
        ("resnet20", {"in_channels": 1.5}, r"build_model in_channels=1\.5; expected an int"),
    ],
)
def test_bad_arguments_raise_value_error(name, kwargs, match):
    args = {"num_classes": 10, "in_channels": 1, "image_size": 28, **kwargs}
    with pytest.raises(ValueError, match=match):
        build_model(name, **args)
