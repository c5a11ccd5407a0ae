"""Benchmarks of KRAdapter's step time and memory against LoRA and the published layer (not part of the tests)."""
