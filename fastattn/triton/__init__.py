"""Triton kernels, one module per op. Importing them needs TRITON_INTERPRET=1 set first to run on CPU."""
