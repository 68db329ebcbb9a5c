"""Batch captioning: local rows in flight, or Ray."""
