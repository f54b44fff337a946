"""Floor 1: what a task is (specs, ImageFolder and built-in domains, sequences) and metrics as pure functions."""
