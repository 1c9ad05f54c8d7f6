"""Tooling around the model files: CLI, converters, data, evaluation, Hub helpers. Never imported by model code."""
