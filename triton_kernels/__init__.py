"""Triton kernels of fusedface, installed as ``fusedface.triton_kernels`` (never as a top-level
``triton_kernels``: the Triton project ships a package of that name)."""
