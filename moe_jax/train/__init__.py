"""Training: losses, optimizer (and, later, the jitted step, loop and checkpoints)."""
