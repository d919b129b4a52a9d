"""The ``explaind`` command (and ``python -m explaind``): the CLI, without gRPC's own log.

gRPC's C core prints its diagnostics (a failed TLS handshake, a bad key) as plain lines
on stderr, before the command's one-line error and outside a server's JSON log. It reads
GRPC_VERBOSITY once, when grpc is imported, so the default is set here, before anything
imports it; GRPC_VERBOSITY=ERROR (or INFO) in the environment shows those lines again.
"""

from __future__ import annotations

import os


def main() -> int:
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    from explaind.client.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
