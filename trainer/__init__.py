"""facecurate's 2DASL trainer: BFM maths, the teacher network, losses, training and rescoring.

Pure library: no Prefect import.
"""
