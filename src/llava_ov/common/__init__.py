"""Helpers every layer may use: export file names, progress, CPU facts."""
