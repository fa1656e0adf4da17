"""Where FLamby keeps a dataset's download script."""
