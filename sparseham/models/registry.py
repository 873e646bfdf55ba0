"""Model zoo of sparse-training papers: :func:`build_model`.

Every model adapts to ``in_channels``, ``num_classes`` and ``image_size``. Convolutions
are Kaiming-normal initialized (fan_out, ReLU) and BatchNorm starts at weight 1, bias 0;
Linear layers keep torch's default initialization. Layers followed by BatchNorm have no
bias. ``"torchvision:<name>"`` builds any torchvision classification model, untrained.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torchvision
from torch import nn

from sparseham.models.cifar import ResNet, WideResNet, init_weights

__all__ = ["MODELS", "VGG16_LAYERS", "build_model", "lenet5", "lenet300", "vgg16"]

MODELS = ("lenet300", "lenet5", "resnet20", "resnet32", "resnet56", "resnet18_cifar",
          "wrn22_2", "vgg16")
# Simonyan & Zisserman's configuration D; "M" is a 2x2 max pooling.
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


def lenet300(*, num_classes: int, in_channels: int, image_size: int) -> nn.Sequential:
    """LeNet-300-100 (LeCun et al. 1998): two hidden ReLU layers of 300 and 100 units."""
    return nn.Sequential(OrderedDict([
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(in_channels * image_size**2, 300)), ("relu1", nn.ReLU(inplace=True)),
        ("fc2", nn.Linear(300, 100)), ("relu2", nn.ReLU(inplace=True)),
        ("fc3", nn.Linear(100, num_classes)),
    ]))


def lenet5(*, num_classes: int, in_channels: int, image_size: int) -> nn.Sequential:
    """LeNet-5 as in Caffe's MNIST example (20 and 50 5x5 filters, 500 hidden units).

    Caffe has no nonlinearity after its convolutions; here a ReLU follows each one, as in
    most pruning papers' PyTorch ports. Needs ``image_size >= 16``.
    """
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"lenet5 needs image_size >= 16, got {image_size}; use lenet300 or "
                         "a resnet for smaller images")
    # Named layers, so logs and reports say conv1/fc1 rather than 0/7.
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, 20, 5)), ("relu1", nn.ReLU(inplace=True)),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(20, 50, 5)), ("relu2", nn.ReLU(inplace=True)),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(50 * side * side, 500)), ("relu3", nn.ReLU(inplace=True)),
        ("fc2", nn.Linear(500, num_classes)),
    ]))
    return init_weights(model)


def vgg16(*, num_classes: int, in_channels: int, image_size: int) -> nn.Sequential:
    """VGG-16 with BatchNorm and the usual CIFAR head (global pooling, one Linear layer).

    A max pooling that would shrink the feature map below 1x1 is left out, so images
    smaller than 32x32 (such as 28x28) keep all 13 convolutions.
    """
    layers: list[nn.Module] = []
    c_in, side = in_channels, image_size
    for spec in VGG16_LAYERS:
        if spec == "M":
            if side >= 2:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            continue
        layers += [nn.Conv2d(c_in, spec, 3, padding=1, bias=False), nn.BatchNorm2d(spec),
                   nn.ReLU(inplace=True)]
        c_in = spec
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return init_weights(nn.Sequential(*layers))


def _resnet(widths: tuple[int, ...], depths: tuple[int, ...]) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return ResNet(widths, depths, in_channels=in_channels, num_classes=num_classes)

    return build


def _wrn(depth: int, width: int) -> Callable[..., nn.Module]:
    def build(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return WideResNet(depth, width, in_channels=in_channels, num_classes=num_classes)

    return build


_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "lenet300": lenet300,
    "lenet5": lenet5,
    # He et al. 2016, Sec. 4.2: 6n+2 layers in three stages of 16, 32 and 64 channels.
    "resnet20": _resnet((16, 32, 64), (3, 3, 3)),
    "resnet32": _resnet((16, 32, 64), (5, 5, 5)),
    "resnet56": _resnet((16, 32, 64), (9, 9, 9)),
    "resnet18_cifar": _resnet((64, 128, 256, 512), (2, 2, 2, 2)),
    "wrn22_2": _wrn(22, 2),
    "vgg16": vgg16,
}


def _set_in_channels(model: nn.Module, in_channels: int, name: str) -> None:
    first = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise ValueError(f"torchvision:{name} has no Conv2d to take {in_channels} input "
                         "channels; use in_channels=3 or another model")
    path, old = first
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, stride=old.stride,
                    padding=old.padding, dilation=old.dilation, groups=old.groups,
                    bias=old.bias is not None, padding_mode=old.padding_mode)
    init_weights(new)
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, new)


def _torchvision(name: str, num_classes: int, in_channels: int) -> nn.Module:
    if name not in torchvision.models.list_models():
        raise ValueError(f"unknown torchvision model {name!r}; see "
                         "torchvision.models.list_models() for the choices")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels != 3:
        _set_in_channels(model, in_channels, name)
    return model


def build_model(name: str, *, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Builds an untrained model.

    Args:
        name: One of :data:`MODELS`, or ``"torchvision:<name>"`` for a torchvision model
            (whose first convolution is replaced when ``in_channels != 3``; ``image_size``
            is not used for those).
        num_classes: Outputs of the classifier.
        in_channels: Channels of the input images.
        image_size: Height and width of the (square) input images.

    Returns:
        The model, in training mode, on the CPU.

    Raises:
        ValueError: An unknown name, or sizes the model cannot take.
    """
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels),
                       ("image_size", image_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"build_model {key}={value!r}; expected an int >= 1")
    if name.startswith("torchvision:"):
        return _torchvision(name.removeprefix("torchvision:"), num_classes, in_channels)
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, "
                         "or torchvision:<name>")
    return _BUILDERS[name](num_classes=num_classes, in_channels=in_channels,
                           image_size=image_size)
