"""Laws of the learning dynamics projected onto a generator: continuous models and the exact discrete law."""
