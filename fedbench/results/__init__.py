"""Results: run records, leaderboards and their formats, figures, kept predictions. Reads and
writes files only; never trains."""
