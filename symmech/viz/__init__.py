"""Figures of a tracker's records: theory (dashed) vs. observed (solid), and errors."""
