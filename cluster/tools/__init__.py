"""Research tooling on top of the system: benchmarks (bench/) and the papers' experiments (experiments/).
Only the CLI imports this room."""
