"""Inference runtimes behind one small contract (see `backends.base`), found through `backends.registry`."""
