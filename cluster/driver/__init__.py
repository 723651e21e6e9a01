"""The driver behind `forkrl train`: the two training loops and what they call (run directory, placement,
recovery, step statistics)."""
