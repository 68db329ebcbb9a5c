"""Measurement tools: bench, evaluate, fidelity."""
