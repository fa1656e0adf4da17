"""The engine: registry, configuration, the federation loop, checkpoints, the federation cache,
one run end to end, profiling. Not for plugins: they import the public API above."""
