"""The real local stack used by the demo, the tests and the benchmarks."""
