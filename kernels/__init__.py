"""Triton kernels of the fused ops, one file per op (installed as ``caer_fast.kernels``).

Each ``<op>.py`` holds the kernels and functions with the signatures of the ``caer_fast::<op>`` ops
(csrc/ops.cpp); ``caer_fast.ops._dispatch`` registers them as the ops' CUDA kernels (and CPU ones
under ``TRITON_INTERPRET=1``) while the backend is "triton" (``_compile`` says how). Importing this
package imports triton; nothing in caer_fast imports it eagerly.
"""
