"""Hydra config tree shipped inside the package (`configs/` at the top level links here)."""
