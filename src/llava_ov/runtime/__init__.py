"""Run an export: no torch, no transformers, no export-time code."""
