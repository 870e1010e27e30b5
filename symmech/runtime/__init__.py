"""The live tracker: binding blocks to parameter slices, optimizer hooks, reductions, laws, history."""
