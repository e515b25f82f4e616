"""Test and demo helpers (nxserve's top layer): `model_factory` writes seeded random-weight Hugging
Face checkpoints, which the tests, the benchmarks and `nxserve make-model` use (no model hub here)."""
