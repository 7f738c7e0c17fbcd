"""Lab scripts and reference implementations. They import the core (the top-level files); the
core imports none of them (tests/test_predict.py checks it)."""
