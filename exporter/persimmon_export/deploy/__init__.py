"""Deployments written from a build directory: the Triton model repository."""
