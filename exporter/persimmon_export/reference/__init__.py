"""The fp32 PyTorch reference model and its greedy decoding: what every build is measured against."""
