"""CPU-only parts of the engine: oneDNN-packed GEMMs and the engine thread's OpenMP team."""
