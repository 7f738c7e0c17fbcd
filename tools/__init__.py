"""Lab scripts and reference implementations (not imported by the training code)."""
