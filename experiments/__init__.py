"""The experiment suite (python -m experiments)."""
