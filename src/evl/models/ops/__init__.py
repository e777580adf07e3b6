"""Kernels of the models' hot paths, each beside the straightforward formulation it is tested against."""
