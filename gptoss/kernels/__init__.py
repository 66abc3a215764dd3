"""Native kernels (XLA FFI custom calls, one shared library). `mxfp4_cpu`: the fused MXFP4 dequantize-matmul for
x86-64 CPUs; `dense_cpu`: the bf16-weight matmul for decode-sized projections; `select`: the `kernels` option."""

from gptoss.kernels.mxfp4_cpu import kernel_available, load_error, mx_gather_matmul
from gptoss.kernels.select import KERNELS, KernelUnavailableWarning, check_kernels, cpu_kernels, default_kernels

__all__ = ["KERNELS", "KernelUnavailableWarning", "check_kernels", "cpu_kernels", "default_kernels",
           "kernel_available", "load_error", "mx_gather_matmul"]
