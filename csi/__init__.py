"""The nbd-csi CSI plugin (`python -m csi`); generated CSI v1.12 code lives in csi.v1."""
