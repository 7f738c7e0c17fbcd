"""Lab scripts and reference implementations. They import the core (the top-level files); the
core imports one of them, and only at the end of a synthetic run: diagnostics (train.py)."""
