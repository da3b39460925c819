"""Benchmarks (`make bench`): measured on this machine, never part of `make test`."""

import os

# Local runs, as `make run`'s: the services the benchmarks build or start (their child processes
# included) take the built-in JWT secret, which they refuse outside development mode.
os.environ.setdefault("DEVELOPMENT_MODE", "true")
