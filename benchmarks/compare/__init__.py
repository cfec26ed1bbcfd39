"""`python -m benchmarks.compare`: lowmem against the methods people would use instead, on the same work."""
