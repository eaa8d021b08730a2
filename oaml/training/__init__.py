"""One training loop for every method: a method is a set of loss terms plus outlier sources."""
