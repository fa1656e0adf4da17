"""Built-in fedbench dataset plugins (imported as `fedbench_datasets`)."""
