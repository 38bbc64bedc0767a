"""Triton kernels of the fused ops, one file per op (installed as ``caer_fast.kernels``).

Importing this package imports triton; nothing in caer_fast imports it eagerly.
"""
