"""Triton kernels of the fused ops, one file per op (installed as ``caer_fast.kernels``).

Importing this package imports triton; nothing in caer_fast imports it eagerly. Importing an op's
module registers its ``torch.library`` ops (``caer_fast::<op>_triton``; see ``_compile`` for how
they are wrapped for ``torch.compile`` and what differs under ``TRITON_INTERPRET=1``).
"""
