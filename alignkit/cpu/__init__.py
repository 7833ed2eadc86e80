"""CPU implementations (numba / chunked torch): the twins of the Triton kernels in alignkit.kernels."""
