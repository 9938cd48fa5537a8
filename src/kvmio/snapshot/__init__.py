"""Checkpoints of a VM: guest memory and machine state, taken in memory and reset fast."""
