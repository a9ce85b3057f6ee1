"""facecurate's 2DASL trainer: model, losses, training, rescoring and evaluation on dataset versions.

Pure library: no Prefect import. It uses the pipeline (the BFM maths in `pipeline.bfm`, the teacher
network in `pipeline.mobilenet`, the store); the pipeline never uses it (tests/test_import_rules.py).
"""
