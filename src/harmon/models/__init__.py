"""Neural network modules of Harmon; attribute names equal the original's state-dict keys."""
