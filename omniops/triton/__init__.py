"""Triton kernels, one module per op family (GPU; CPU tensors through TRITON_INTERPRET=1 in tests).

Grids are persistent (about one program per SM/core, looping over tiles): triton-ascend binds programs to
physical AI cores and rejects grids larger than the core count.
"""
