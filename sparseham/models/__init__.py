"""The model zoo of the training application: LeNets, VGG-16 and torchvision models by name
(``registry``), the CIFAR ResNets and Wide ResNets (``cifar``), and Hugging Face causal LMs
built from a config (``hf``)."""

from sparseham.models.hf import CausalLM, build_causal_lm
from sparseham.models.registry import MODELS, build_model

__all__ = ["MODELS", "CausalLM", "build_causal_lm", "build_model"]
