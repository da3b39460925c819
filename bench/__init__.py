"""Benchmarks (`make bench`): measured on this machine, never part of `make test`."""
