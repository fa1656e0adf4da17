"""Stand-in download script (never run by the tests): its presence is what the bridge names."""
