"""Benchmarks of smallthinker_lab: ceilings of the machine, the engine against its bound and against baselines."""
