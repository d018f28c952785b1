"""The end-to-end scenario (docs/e2e.md): CSI calls in the sidecars' order, VMs on the volumes."""
