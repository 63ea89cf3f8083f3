"""Memory: named byte terms, one calibration, the attention and whole-model memory models, one fit cache."""
