"""Explanation methods as plain, typed PyTorch engines.

Each subpackage implements one paper's methods on tensors and ``nn.Module`` objects and
knows nothing of gRPC: the service's servicers translate messages and call into here,
and analysts can use the same classes in-process.
"""
