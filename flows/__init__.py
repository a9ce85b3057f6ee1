"""Prefect flows and the `facecurate` command: they only compose `pipeline` and `trainer`."""
