"""Benchmarks and dev tools: numbers measured side by side in one run and printed as ratios (not tests).

Nothing in agent/, backends/ or cloud_console/ imports this package (`make lint` checks it);
`edge-agent bench` loads `bench.cli` only when that command is run.
"""
