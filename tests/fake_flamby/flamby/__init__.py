"""Stand-in for the flamby package (tests only)."""
