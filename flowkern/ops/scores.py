"""Triton implementation (work in progress: registers nothing yet)."""
