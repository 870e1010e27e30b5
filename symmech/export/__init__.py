"""Renderers of a derivation: plain-text summaries and LaTeX documents (Jinja2 templates)."""
