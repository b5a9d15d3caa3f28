"""Modules: parameters plus calls into fastattnreg.ops, no kernel logic of their own."""
