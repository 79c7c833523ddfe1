"""Benchmarks: measured figures of a running Ferry, never asserted by the test suite."""
