"""The toxic-memory study (Das et al. 2025) as a pipeline."""
