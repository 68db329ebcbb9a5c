"""Export-time tools: convert, compress, calibrate (torch, transformers, NNCF live here)."""
