"""Native kernels (XLA FFI custom calls, one shared library). `mxfp4_cpu`: the fused MXFP4 dequantize-matmul for
x86-64 CPUs; `dense_cpu`: the bf16-weight matmul for decode-sized projections."""

from gptoss.kernels.mxfp4_cpu import (
    KernelUnavailableWarning,
    kernel_available,
    kernel_enabled,
    kernel_mode,
    mx_gather_matmul,
    set_kernel_mode,
    use_kernel,
)

__all__ = ["KernelUnavailableWarning", "kernel_available", "kernel_enabled", "kernel_mode", "mx_gather_matmul",
           "set_kernel_mode", "use_kernel"]
