"""The model zoo of the training application: LeNets, VGG-16 and torchvision models by name
(``registry``), and the CIFAR ResNets and Wide ResNets (``cifar``)."""

from sparseham.models.registry import MODELS, build_model

__all__ = ["MODELS", "build_model"]
