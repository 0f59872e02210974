"""``blocktrack send``: a full copy of quiescent devices as a QEMU block-migration stream."""

from __future__ import annotations

import argparse

from blocktrack import secure, transport
from blocktrack.commands.common import (add_device_arguments, add_json_flag, make_progress, named_devices,
                                        parse_size, print_summary, remote_device_spec)
from blocktrack.errors import PeerError, UsageError
from blocktrack.migrate.sender import send_devices

DESCRIPTION = """\
Read each device (or image file) with O_DIRECT and write all of it, chunk by chunk (1 MiB),
as the block section of a QEMU migration stream: to a file, to stdout, or to a
`blocktrack receive --listen` over TCP. The devices must not change while they are sent:
this is a full copy of quiescent devices (live migration is `blocktrack migrate`).

The stream is what QEMU 7.2 writes for `migrate` with the block capability, so QEMU's
loader and `blocktrack receive` both read it. Device names travel on the wire; the receiver
maps them to its own targets."""

EPILOG = """\
examples:
  blocktrack send --device disk0=/dev/vg0/db --to 10.0.0.2:7000 --psk-file /etc/blocktrack/psk
  blocktrack send --device disk0=/dev/vg0/db --to ssh://root@target --remote-device disk0=/dev/vg1/db
  blocktrack send --device a=a.img --device b=b.img --output - | blocktrack receive --device a=/dev/sdx --device b=/dev/sdy --input -
  blocktrack send --device disk0=disk.img --zero-blocks --envelope none --output disk.stream
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser("send", help="stream devices in QEMU's block-migration format",
                                   description=DESCRIPTION, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_arguments(parser, "a device or image file to send, and the name it has on the wire (repeatable)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--output", metavar="FILE|-", help="write the stream to FILE, or to stdout with -")
    where.add_argument("--to", metavar="HOST:PORT|ssh://[USER@]HOST[:PORT][/PATH]",
                       help="connect to a `blocktrack receive --listen` and send there (with --tls-*, --psk-file "
                            "or --insecure), or run `blocktrack receive --input -` on HOST over ssh (PATH: the "
                            "remote blocktrack command, default `blocktrack`)")
    parser.add_argument("--remote-device", action="append", metavar="NAME=PATH", type=remote_device_spec,
                        help="ssh: the remote target for device NAME (repeatable); passed whole to the remote "
                             "`blocktrack receive --device`, which splits it as --device says")
    parser.add_argument("--ssh-option", action="append", metavar="KEY=VALUE",
                        help="ssh: an extra `ssh -o KEY=VALUE` (repeatable), e.g. IdentityFile=~/.ssh/mig")
    parser.add_argument("--envelope", choices=("qemu", "none"), default="qemu",
                        help="qemu (default): a whole QEMU 7.2 migration stream around the block section; "
                             "none: the bare block section records")
    parser.add_argument("--zero-blocks", action="store_true",
                        help="send all-zero chunks as a header with the ZERO_BLOCK flag instead of 1 MiB of zeros "
                             "(QEMU's zero-blocks capability)")
    parser.add_argument("--rate-limit", type=parse_size, metavar="BYTES_PER_S",
                        help="cap the stream's average rate (bytes per second; K, M, G suffixes are binary)")
    parser.add_argument("--depth", type=int, default=8, metavar="N",
                        help="reads kept in flight per device (default 8)")
    secure.add_arguments(parser, receiver=False)
    add_json_flag(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    devices = named_devices(args)
    data_on_stdout = args.output == "-"
    ssh = bool(args.to) and secure.is_ssh_url(args.to)
    sec = secure.from_args(args, tcp=bool(args.to) and not ssh)
    if args.remote_device and not ssh:
        raise UsageError("--remote-device is for --to ssh://HOST (it names the far side's targets)")
    if ssh:
        if not args.remote_device:
            raise UsageError("--to ssh://... needs --remote-device NAME=PATH for each device: the targets the "
                             "remote `blocktrack receive` writes")
        remote = ["receive", "--input", "-"]
        for text in args.remote_device:
            remote += ["--device", text]
        sink = secure.SshChannel(secure.parse_ssh_url(args.to), remote, stall_timeout=sec.stall_timeout,
                                 options=args.ssh_option or ())
    elif args.to:
        sink = secure.connect_channel(args.to, sec)
    else:
        sink = transport.open_sink(args.output)
    if args.rate_limit:
        sink = transport.RateLimitedSink(sink, args.rate_limit)
    progress = make_progress(args, "send", data_on_stdout)
    try:
        summary = send_devices(devices, sink, envelope=args.envelope, zero_blocks=args.zero_blocks,
                               progress=progress, depth=args.depth)
        channel = sink.inner if args.rate_limit else sink
        if ssh:
            # The stream is sent; success is the remote receiver's: it exits 0 only once every write
            # is on stable storage.
            status = channel.finish(max(60.0, sec.stall_timeout))
            if status != 0:
                raise PeerError(f"the remote `blocktrack receive` on {channel.name} failed (exit status "
                                f"{status}; its message is above)")
        elif args.to:
            # FIN after the last byte, then wait for the receiver to close: a close with unread input
            # (TLS session tickets) would reset the connection and cut the stream's tail.
            channel.end_output()
            channel.drain()
    finally:
        progress.close()
        sink.close()
    print_summary(args, "send", summary.as_dict(), data_on_stdout)
    return 0
