"""Tools, each run from the repository root as `python -m tools.NAME`: benchmarks, the staleness lab, SFT, gpu-check."""
