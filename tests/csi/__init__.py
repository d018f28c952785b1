"""Tests of the CSI plugin (`python -m csi`), run as a real process and called over gRPC."""
