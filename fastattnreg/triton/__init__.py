"""Triton kernels and their launchers, one module per op (attention, match, refiner), with the
helpers they share: tiles.py (tile loads and stores, masks, logits, online LSE, the autotuned
tile lists), teacher.py (the match loss's plug-in of the attention kernels), dropout.py (the
keep-mask stream).

Nothing here is imported by `fastattnreg` unless Triton is installed: fastattnreg.ops imports these
modules behind fastattnreg.backend's check, so the package works without Triton.
"""
