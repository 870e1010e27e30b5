"""Data sets and small models for symmech's demo, tests and benchmarks."""
