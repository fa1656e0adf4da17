"""Built-in fedbench method and adapter plugins (import name `fedbench_plugins`)."""
