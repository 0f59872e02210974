"""blocktrack: track the writes to a live block device and stream it to another host
in QEMU's block-migration wire format."""

__version__ = "0.1.0"
