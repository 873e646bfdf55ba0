"""Residual networks for CIFAR-sized inputs: ResNet-20/32/56, ResNet-18 and WRN-22-2.

All end in global average pooling, so any input size of at least 8x8 works (for example
1x28x28 MNIST). Convolutions have ``bias=False`` because BatchNorm follows them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "PreActBlock", "ResNet", "WideResNet", "init_weights"]


def init_weights(model: nn.Module) -> nn.Module:
    """Kaiming-normal convolutions (fan_out, ReLU), unit BatchNorm; Linear keeps torch's default.

    This is the initialization of torchvision's ResNets, which CIFAR codebases copy.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """He et al. 2016's basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU.

    When the shape changes, the shortcut is a strided 1x1 convolution plus BatchNorm
    (He et al.'s option B), not option A's zero padding, so every weight is a real layer.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A ResNet with a 3x3 stride-1 stem and no max pooling, for small images.

    Args:
        widths: Channels of each stage; stages after the first halve the resolution.
        depths: Basic blocks per stage.
        in_channels: Input channels.
        num_classes: Outputs of the final Linear layer.
    """

    def __init__(self, widths: Sequence[int], depths: Sequence[int], *, in_channels: int,
                 num_classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU(inplace=True))
        blocks, c_in = [], widths[0]
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for i in range(depth):
                blocks.append(BasicBlock(c_in, width, 2 if stage > 0 and i == 0 else 1))
                c_in = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class PreActBlock(nn.Module):
    """Zagoruyko & Komodakis 2016's pre-activation block: BN-ReLU-conv-BN-ReLU-conv.

    When the shape changes, the shortcut is a strided 1x1 convolution of the pre-activated
    input, as in the authors' code.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis 2016) without dropout.

    Args:
        depth: ``6 * n + 4`` for ``n`` blocks per stage (22 gives 3).
        width: The widening factor ``k``; stages have 16k, 32k and 64k channels.
        in_channels: Input channels.
        num_classes: Outputs of the final Linear layer.
    """

    def __init__(self, depth: int, width: int, *, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth {depth} is not 6n+4; use 16, 22, 28 or 40")
        n = (depth - 4) // 6
        self.stem = _conv3x3(in_channels, 16)
        blocks, c_in = [], 16
        for stage, c_out in enumerate((16 * width, 32 * width, 64 * width)):
            for i in range(n):
                blocks.append(PreActBlock(c_in, c_out, 2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn(self.layers(self.stem(x))))
        return self.fc(self.pool(out).flatten(1))
