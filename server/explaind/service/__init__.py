"""The gRPC layer: thin servicers that translate messages and call the engine."""

from .server import SERVICE_NAMES, ExplaindServer, serve

__all__ = ["SERVICE_NAMES", "ExplaindServer", "serve"]
