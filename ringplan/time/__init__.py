"""Time: links (α–β), kernels, GEMMs, ring passes, the simulator, attention and whole-model step time."""
