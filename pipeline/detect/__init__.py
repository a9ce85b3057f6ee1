"""Face detectors and 68-point landmarkers, each one callable built from its catalog entry."""
