"""A plain module named like a dataset (as FLamby's fed_dummy_dataset.py): not a dataset package,
so the bridge lists nothing for it."""
