"""Symmetries on a real PyTorch model: tensor actions, detection, numeric confirmation, G1/G2 checks."""
