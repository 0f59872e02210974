"""blocktrack's NBD front-end: a server that serves a device or image file and marks every write.

Modules, from the wire up:

- ``protocol``: every constant and byte layout of the NBD protocol (the only place that knows them);
- ``sockio``: exact receives into caller buffers and gathered sends;
- ``export``: the served device or file (O_DIRECT where aligned) and its dirty map; the one place
  where writes, trims and zeroes are marked dirty;
- ``metacontext``: ``base:allocation`` and ``qemu:dirty-bitmap:blocktrack`` for NBD_CMD_BLOCK_STATUS;
- ``handshake``: fixed newstyle option haggling (and the oldstyle greeting);
- ``connection``: the transmission phase of one connection, requests served in parallel;
- ``server``: listeners, connection threads, the freeze gate, shutdown;
- ``client``: a small synchronous client (tests, diagnostics, reading a server's dirty map).
"""

from blocktrack.nbd.export import Export
from blocktrack.nbd.server import Gate, NbdServer

__all__ = ["Export", "Gate", "NbdServer"]
