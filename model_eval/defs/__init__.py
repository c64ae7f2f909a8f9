"""Dagster wiring: assets, jobs and resources. Each piece only calls model_eval's core functions."""
