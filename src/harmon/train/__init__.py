"""Training: the original's objectives (and, later, data and the loop)."""
