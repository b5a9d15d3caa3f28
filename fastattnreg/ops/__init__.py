"""Ops: each pairs its kernels with input checks, autograd, a fake kernel and a reference."""
