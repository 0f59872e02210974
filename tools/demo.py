"""`make demo`: a blocktrack copy you can watch, on image files, with no root, LVM or kernel modules.

It makes a 256 MiB source image (random data with zero regions), starts `blocktrack receive` on
loopback TCP, sends the image with `blocktrack send --zero-blocks`, and checks that the target is
byte-identical (sha256 of both). The live migration demo (a writer running during the copy, cutover
and verification by the tool itself) replaces this once `blocktrack migrate` exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT))
BT = [sys.executable, "-m", "blocktrack"]
MiB = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
    return digest.hexdigest()


def main() -> int:
    size = int(os.environ.get("DEMO_SIZE_MIB", "256")) * MiB
    with tempfile.TemporaryDirectory(prefix="blocktrack-demo-") as tmp:
        src, dst = Path(tmp) / "source.img", Path(tmp) / "target.img"
        rng = random.Random(2026)
        with open(src, "wb") as f:
            for chunk in range(size // MiB):
                f.write(bytes(MiB) if chunk % 4 == 3 else rng.randbytes(MiB))
        with open(dst, "wb") as f:
            f.truncate(size)
        print(f"demo: source {src} ({size >> 20} MiB, every 4th MiB zero), empty target {dst}")
        receiver = subprocess.Popen([*BT, "receive", "--listen", "127.0.0.1:0", "--device", f"demo={dst}",
                                     "--expect-full", "--json"], stdout=subprocess.PIPE, env=ENV, text=True)
        port = json.loads(receiver.stdout.readline())["port"]
        print(f"demo: blocktrack receive listening on 127.0.0.1:{port}")
        sender = subprocess.run([*BT, "send", "--device", f"demo={src}", "--to", f"127.0.0.1:{port}",
                                 "--zero-blocks"], env=ENV)
        received = [json.loads(line) for line in receiver.stdout]
        receiver.wait()
        if sender.returncode or receiver.returncode:
            print(f"demo: FAILED (send exit {sender.returncode}, receive exit {receiver.returncode})")
            return 1
        summary = received[-1]
        same = sha256(src) == sha256(dst)
        print(f"demo: received {summary['chunks']} chunks ({summary['zero_chunks']} as zero blocks), "
              f"{summary['stream_bytes'] / size:.2f} bytes on the wire per device byte, "
              f"{summary['mb_per_s']} MB/s")
        print(f"demo: sha256 source == target: {same}")
        print("demo: result:", "VERIFIED" if same else "MISMATCH")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
