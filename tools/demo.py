"""`make demo`: a live migration you can watch, on image files, with no root, LVM or kernel modules.

It makes two 256 MiB image files, starts `blocktrack receive --listen` on loopback TCP (TLS 1.3,
both ends authenticated by a pre-shared key made for the demo: `--psk-file`), and runs
`blocktrack migrate --backend nbd`: the migrating process serves the source image over NBD on a Unix
socket, and a writer process (blocktrack's own NBD client) keeps writing random data through it
while the image is copied. The link is rate-limited so the writer has time to matter. The tool
converges, freezes the writer, sends the last dirty chunks, verifies the target by digest, and the
demo checks once more with sha256 of both files before retiring the source with `blocktrack
release --retire` (the writer's held write is then refused, never lost).

Knobs (environment): DEMO_SIZE_MIB (256), DEMO_LINK_MIB (64, MiB/s), DEMO_WRITER_PERCENT (20).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from blocktrack.migrate.scenario import MiB, live_migration  # noqa: E402


def make_source(path: Path, size: int) -> None:
    rng = random.Random(2026)
    with open(path, "wb") as f:
        for chunk in range(size // MiB):
            f.write(bytes(MiB) if chunk % 8 == 7 else rng.randbytes(MiB))


def main() -> int:
    size = int(os.environ.get("DEMO_SIZE_MIB", "256")) * MiB
    link = int(os.environ.get("DEMO_LINK_MIB", "64")) * MiB
    percent = float(os.environ.get("DEMO_WRITER_PERCENT", "20"))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="blocktrack-demo-") as tmp:
        work = Path(tmp)
        source, target = work / "source.img", work / "target.img"
        make_source(source, size)
        with open(target, "wb") as f:
            f.truncate(size)
        psk = work / "demo.psk"  # both ends prove they hold it; plain TCP would need --insecure
        fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)   # never readable by others
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex())   # what `openssl rand -hex 32` makes
        print(f"demo: source {source} ({size >> 20} MiB of random data, every 8th MiB zero), empty target {target}")
        print(f"demo: blocktrack migrate --backend nbd serves the source on {work / 'nbd.sock'}; a writer process "
              f"writes random data through it at {percent:.0f} % of a {link >> 20} MiB/s link")

        def show(event: dict) -> None:
            kind = event.get("event")
            if kind == "connected":
                print(f"demo:   connected to the receiver over TLS, pre-shared key verified both ways "
                      f"(migration {event['migration_id']})")
            elif kind == "phase" and event["phase"] in ("bulk", "dirty", "cutover", "verify"):
                extra = ""
                if event["phase"] == "cutover":
                    extra = (f" ({event['pending_bytes'] / MiB:.1f} MiB pending at {event['link_mb_per_s']} MB/s: "
                             "writes frozen)")
                print(f"demo:   {event['phase']}{extra}")
            elif kind == "pass":
                print(f"demo:   pass {event['pass']}: {event['chunks']} dirty chunks sent in {event['seconds']:.2f} s, "
                      f"{event['dirty_after']} dirtied meanwhile (writer {event['dirty_mb_per_s']} MB/s, "
                      f"link {event['link_mb_per_s']} MB/s)")
            elif kind in ("not_converging", "warning", "cutover_aborted"):
                print(f"demo:   {kind}: {event.get('message', event)}")

        result = live_migration(source, target, work, writer_rate=percent / 100 * link, rate_limit=link,
                                on_event=show, retire=True, seed=2026, auth=("--psk-file", str(psk)))
        summary = result.summary
        if summary is None or result.migrate_code != 0:
            print(f"demo: FAILED (migrate exit {result.migrate_code})\n{result.migrate_stderr}")
            return 1
        writer = result.writer_stats or {}
        ratio = summary["sent_bytes"] / summary["size"]
        print()
        print("demo: summary")
        print(f"  passes:     bulk + {summary['passes']} dirty + final ({summary['final_chunks']} chunks)")
        print(f"  sent:       {summary['sent_bytes'] / MiB:.0f} MiB = {ratio:.2f} x the {size >> 20} MiB device "
              f"({summary['zero_chunks']} chunks as zero blocks)")
        print(f"  downtime:   {summary['downtime_ms']:.0f} ms (writes frozen → target verified; budget "
              f"{summary['max_downtime_ms']} ms)")
        refused = any(e.get("event") == "write_refused" for e in result.writer_events)
        print(f"  writer:     {writer.get('writes', 0)} writes during the migration"
              + ("; its write after the cutover was held, then refused by `blocktrack release --retire`"
                 if refused else "; it had no write waiting at the cutover"))
        compared = f"{summary['chunks_verified']} of {summary.get('chunks', summary['chunks_verified'])} chunks"
        print(f"  verified:   by blocktrack ({compared} compared, XXH3-128 digest maps of both ends): "
              f"{summary['result']}; by this demo (sha256 of source and target): "
              f"{'identical' if result.identical else 'DIFFERENT'}")
        ok = summary["result"] == "verified" and result.identical
        print(f"demo: result: {'VERIFIED' if ok else 'MISMATCH'} in {time.monotonic() - started:.1f} s")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
