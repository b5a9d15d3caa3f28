"""Triton kernels and their launchers, one module per op (see DESIGN.md).

Nothing here is imported by `fastattnreg` unless Triton is installed: fastattnreg.ops imports these
modules behind fastattnreg.backend's check, so the package works without Triton.
"""
