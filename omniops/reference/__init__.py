"""Pure-torch oracles, one module per op family. Used by tests, benchmarks, and as the `reference` backend."""
