"""What a symmetry implies: checks of the action, geometry (G1-G3, E1/E2), Noether charge, closure, data terms."""
