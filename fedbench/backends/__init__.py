"""Backends of `fedbench grid`: planning the cells (grid), running them here (local) or on a
Ray cluster (ray_backend)."""
