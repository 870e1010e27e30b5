"""Matrix expressions, exact linear maps and the NumPy/torch evaluator the rest of symmech builds on."""
