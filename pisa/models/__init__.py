"""Detectors: torchvision models with PISA heads, built from a `ModelConfig`; imports core only."""

from pisa.models.backbones import build_backbone
from pisa.models.builder import build_detector, fixed_input_size

__all__ = ["build_backbone", "build_detector", "fixed_input_size"]
