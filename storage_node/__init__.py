"""nbd-csi storage node: keeps volume images on local disk and serves them over NBD."""
