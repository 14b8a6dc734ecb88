"""Hydra's configuration, installed as ``tlexp.conf`` (pyproject.toml) so the CLIs find it anywhere."""
