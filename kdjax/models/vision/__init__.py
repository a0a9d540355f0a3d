"""Image classifiers for distillation: the CIFAR convnets of RepDistiller / mdistiller and ViT / DeiT.

Every model is an NNX module called as ``model(images [B, H, W, C] float32, *, train=False)`` that returns
logits ``[B, num_classes]``, records its intermediate activations with :mod:`kdjax.models.capture` and
lists their names in ``activation_names()``; :func:`activation_shapes` gives their shapes without running.
"""

from kdjax.models.vision.mobilenet import MobileNetV2
from kdjax.models.vision.registry import VISION_MODELS, activation_shapes, count_params, vision_model
from kdjax.models.vision.resnet import ResNet
from kdjax.models.vision.vgg import VGG
from kdjax.models.vision.vit import ViT
from kdjax.models.vision.wrn import WideResNet

__all__ = ["MobileNetV2", "ResNet", "VGG", "VISION_MODELS", "ViT", "WideResNet", "activation_shapes", "count_params",
           "vision_model"]
