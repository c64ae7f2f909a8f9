"""Benchmarks of model_eval; run them all with `python benchmarks/run.py` (see benchmarks/README.md).

A package so that run.py and the subprocesses it starts (`python -m benchmarks.fake_endpoint`,
`python -m benchmarks.memory`) import the same helpers by one unambiguous name.
"""
