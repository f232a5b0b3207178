"""Does a build compute what the reference computes: parity bounds, true-precision emulation."""
