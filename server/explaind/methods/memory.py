"""Telling the host's memory running out from a bug, for the methods and the service alike
(neither gRPC nor the service's errors are imported here: the methods know nothing of them)."""

from __future__ import annotations

# How PyTorch's CPU allocator says an allocation failed (c10's alloc_cpu): a RuntimeError
# ("[enforce fail at alloc_cpu.cpp:...] ... DefaultCPUAllocator: can't allocate memory: you
# tried to allocate N bytes"), where numpy raises MemoryError.
_TORCH_CPU_OUT_OF_MEMORY = "DefaultCPUAllocator: can't allocate memory"


def is_host_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the host's memory refusing an allocation: Python's or numpy's
    MemoryError, or PyTorch's CPU allocator's RuntimeError (torch raises no MemoryError)."""
    return isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and _TORCH_CPU_OUT_OF_MEMORY in str(error))
