"""Attention initialisations: structured (impulse) and mimetic, docs/methods.md section 2.

Both work in place on any ViT whose attention layers have a `qkv` Linear, a `proj` Linear and
`num_heads` (fastattnreg's VisionTransformer and timm's) and return a small report.
"""
from .mimetic import MimeticInitReport, mimetic_init_
from .structured import StructuredInitReport, pseudo_input, structured_init_

__all__ = [
    "structured_init_",
    "mimetic_init_",
    "StructuredInitReport",
    "MimeticInitReport",
    "pseudo_input",
]
