"""Where FLamby keeps a dataset's licence marker and download script."""
