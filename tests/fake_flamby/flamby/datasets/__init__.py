"""Stand-in for flamby.datasets (tests only)."""
