"""Migration: full copies (sender, receiver) and live migration.

Full copies of quiescent devices: ``sender`` (devices → stream) and ``receiver`` (stream → targets).

Live migration, from the bottom up:

- ``source``: TrackedSource, what the engine needs from a device whose writes are tracked;
- ``nbd_source``: that protocol over blocktrack's NBD server (the ``--backend nbd`` adapter);
- ``savedstate``: the progress both ends keep for --resume and release;
- ``link``: the sender's end of the connection (handshake, framed stream, acknowledgements);
- ``verify``: chunk digests;
- ``engine``: the sender's state machine (bulk, dirty passes, cutover, final pass, verification);
- ``live_receiver``: the receiving end (refusals, acknowledgements, digests, verdict);
- ``control``: the running migration's control socket, for ``blocktrack release``;
- ``loadgen`` and ``scenario``: a writer through NBD and end-to-end runs, for the demo, bench and tests.

The bytes on the wire are defined in blocktrack.wire (layout.py for QEMU's stream, control.py for
the protocol around it).
"""
