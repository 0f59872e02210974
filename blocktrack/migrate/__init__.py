"""Migration: the sender (devices → stream) and the receiver (stream → targets)."""
