"""Model families, one folder each: `<name>/runtime.py` (torch-free) and `<name>/export.py` (conversion).

The runtime reaches them only through `llava_ov.runtime.families` (a lazy registry by architecture).
"""
