"""Authenticated transports for migration streams: TLS on direct TCP, and the system's ssh.

A receiver runs as root and writes what arrives onto block devices, so a connection must prove who
it comes from before a single stream byte is read. The ways in:

* ``ssh://[user@]host[:port][/path/to/blocktrack]`` (sender side only): the sender runs
  ``blocktrack receive --input - ...`` on the far host through ``ssh -o BatchMode=yes``; ssh does
  the authentication (keys, known_hosts) the way operators already move disks, the stream goes to
  the remote command's stdin and its replies come back on its stdout. Nothing listens. The remote
  command line is built from an argv list, each word quoted with shlex.quote (ssh hands it to the
  remote shell as one string), and the host may not start with "-" (it would be an ssh option).
* TLS 1.3 with certificates (``--tls-cert/--tls-key/--tls-ca`` on both ends): each end presents a
  certificate signed by the CA it was given and requires one from the other (the receiver asks for
  the client's certificate; the sender checks the receiver's name against the address it dialled).
* TLS 1.3 with a pre-shared key file (``--psk-file``): Python's ssl has TLS-PSK only from 3.13, so
  here TLS runs with a throw-away self-signed receiver certificate (made with the ``openssl``
  command) and both ends then prove they hold the key with an HMAC challenge-response bound to that
  certificate, keyed by a salted scrypt of the key (blocktrack.psk: the key-file rules and the
  threat model; layout in wire/control.py, "pre-shared-key authentication"). A man in the middle
  must present its own certificate, so proofs it relays name the wrong one and fail.
* plain TCP only with ``--insecure`` (both ends): for a test, or a link that is already private.

Failures of authentication are AuthenticationError (exit 5 for the sender), raised before the
receiver reads a HELLO or a stream byte, so nothing can reach a target; the receiver reports the
refused connection and goes on waiting for an authenticated one. It authenticates every connection
that arrives side by side, each within --handshake-timeout, with caps per source address and
overall (blocktrack.acceptor), so connections that never finish a handshake cannot keep the sender
out. TLS sockets become transport.SocketChannel (non-blocking, one SSL call at a time, stall
timeouts); the TLS and PSK handshakes themselves run blocking, bounded by the handshake timeout on
the receiver and the stall timeout on the sender.
"""

from __future__ import annotations

import errno
import os
import shlex
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass

from blocktrack import acceptor, psk
from blocktrack.errors import AuthenticationError, PeerError, StreamError, UsageError
from blocktrack.transport import Listener, PipeChannel, SocketChannel, parse_host_port, set_keepalive

DEFAULT_STALL_TIMEOUT = 60.0
_SOCKET_BUFFER = 4 << 20


# -- options -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Security:
    """How a TCP connection is authenticated (exactly one of certificates, psk, insecure)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    psk_file: str | None = None
    insecure: bool = False
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    handshakes: acceptor.Limits = acceptor.Limits()  # the receiver's (--handshake-timeout, --max-handshakes*)

    @property
    def mode(self) -> str:
        return "insecure" if self.insecure else "psk" if self.psk_file else "cert"


SECURITY_HELP = """\
authentication of direct TCP (both ends must agree):
  --tls-cert/--tls-key/--tls-ca   TLS 1.3, mutual: each end shows a certificate signed by the CA
  --psk-file FILE                 TLS 1.3, and both ends prove they hold the key in FILE
                                  (a random key: `openssl rand -hex 32`; owned by root or
                                  the caller, not readable by group or others)
  --insecure                      plain TCP, no authentication, no encryption
  one of them is required; plain TCP is never chosen silently."""


def add_arguments(parser, *, receiver: bool) -> None:
    group = parser.add_argument_group("security and timeouts")
    peer = "senders" if receiver else "the receiver"
    group.add_argument("--tls-cert", metavar="PEM", help="TLS: this end's certificate (with --tls-key, --tls-ca)")
    group.add_argument("--tls-key", metavar="PEM", help="TLS: the private key of --tls-cert")
    group.add_argument("--tls-ca", metavar="PEM",
                       help=f"TLS: the CA certificate(s) {peer} must be signed by (a certificate is required)")
    group.add_argument("--psk-file", metavar="FILE",
                       help="authenticate both ends with the pre-shared key in FILE, inside TLS 1.3: a random key "
                            "(e.g. `openssl rand -hex 32`; at least 16 bytes, no pattern, a typed passphrase at "
                            "least 32 characters), owned by root or the caller, mode 0600")
    group.add_argument("--insecure", action="store_true",
                       help="allow plain TCP: no authentication, no encryption (tests, private links)")
    group.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                       help=f"give up (exit 5) when the peer sends nothing, or takes nothing, for this long; "
                            f"keep-alives keep an idle but healthy link open (default {DEFAULT_STALL_TIMEOUT:g})")
    if receiver:
        group.add_argument("--handshake-timeout", type=float, default=acceptor.DEFAULT_HANDSHAKE_TIMEOUT,
                           metavar="SECONDS",
                           help="close a connection that has not authenticated this long after it arrived (TLS "
                                "and key proof in all; default %(default)g)")
        group.add_argument("--max-handshakes-per-address", type=int, default=acceptor.DEFAULT_PER_SOURCE,
                           metavar="N",
                           help="handshakes at once from one address (an IPv6 /64 counts as one); a newer "
                                "connection takes the place of the oldest (default %(default)d)")
        group.add_argument("--max-handshakes", type=int, default=acceptor.DEFAULT_TOTAL, metavar="N",
                           help="handshakes at once in all; a newcomer takes the place of the oldest of the "
                                "address with the most (default %(default)d)")


def from_args(args, *, tcp: bool) -> Security:
    """Validate the security options; ``tcp`` says whether a TCP connection will be made."""
    if args.stall_timeout <= 0:
        raise UsageError("--stall-timeout must be positive (seconds)")
    handshakes = acceptor.Limits()
    if hasattr(args, "handshake_timeout"):  # receive only
        if args.handshake_timeout <= 0:
            raise UsageError("--handshake-timeout must be positive (seconds)")
        if args.max_handshakes_per_address < 1 or args.max_handshakes < 1:
            raise UsageError("--max-handshakes and --max-handshakes-per-address must be at least 1")
        handshakes = acceptor.Limits(args.handshake_timeout, args.max_handshakes_per_address, args.max_handshakes)
    tls = [args.tls_cert, args.tls_key, args.tls_ca]
    chosen = sum([any(tls), bool(args.psk_file), bool(args.insecure)])
    if not tcp:
        if any(tls) or args.psk_file or args.insecure:
            raise UsageError("--tls-*, --psk-file and --insecure apply to direct TCP only (ssh and pipes "
                             "bring their own security)")
        return Security(stall_timeout=args.stall_timeout, handshakes=handshakes)
    if chosen == 0:
        raise UsageError("direct TCP needs authentication: --tls-cert/--tls-key/--tls-ca or --psk-file on both "
                         "ends, or --insecure for plain, unauthenticated TCP (or use --to ssh://HOST)")
    if chosen > 1:
        raise UsageError("choose one of TLS certificates, --psk-file and --insecure")
    if any(tls) and not all(tls):
        raise UsageError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
    for path in filter(None, tls + [args.psk_file]):
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
    if args.psk_file:
        psk.read_key_file(args.psk_file)  # a bad key file is a usage error now, not after listening
    return Security(args.tls_cert, args.tls_key, args.tls_ca, args.psk_file, bool(args.insecure),
                    args.stall_timeout, handshakes)


# -- TLS ---------------------------------------------------------------------------------------------


def _context(sec: Security, *, server: bool) -> tuple[ssl.SSLContext, bytes | None]:
    """The TLS context, and in PSK mode on the server the DER of its throw-away certificate."""
    own_der = None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        if sec.mode == "cert":
            ctx.load_cert_chain(sec.cert, sec.key)
            ctx.load_verify_locations(cafile=sec.ca)
            ctx.verify_mode = ssl.CERT_REQUIRED  # the server too: no client certificate, no stream
        elif server:
            own_der = _load_throwaway_cert(ctx)
        else:
            ctx.check_hostname = False  # the PSK proof authenticates, bound to this certificate
            ctx.verify_mode = ssl.CERT_NONE
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"cannot load the TLS certificate, key or CA: {exc}") from None
    return ctx, own_der


def _load_throwaway_cert(ctx: ssl.SSLContext) -> bytes:
    """A fresh self-signed P-256 certificate for this one connection (PSK mode's receiver)."""
    with tempfile.TemporaryDirectory(prefix="blocktrack-tls-") as folder:
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", "/CN=blocktrack-psk", "-days", "2", "-keyout", key, "-out", cert]
        try:
            subprocess.run(argv, check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise UsageError(f"--psk-file needs the openssl command for a throw-away certificate: {exc}") from None
        ctx.load_cert_chain(cert, key)
        with open(cert) as f:
            return ssl.PEM_cert_to_DER_cert(f.read())


def _handshake_errors(what: str, sec: Security, step, *, timeout: float, timeout_flag: str,
                      credentials_refused=lambda: None):
    try:
        return step()
    except ssl.SSLCertVerificationError as exc:
        credentials_refused()
        raise AuthenticationError(f"{what}: certificate not accepted: {exc.verify_message or exc.reason}") from None
    except ssl.SSLError as exc:
        credentials_refused()
        raise AuthenticationError(f"{what}: TLS handshake failed ({exc.reason or exc}); do both ends use "
                                  "the same kind of authentication and trusted CAs?") from None
    except AuthenticationError as exc:
        raise AuthenticationError(f"{what}: {exc}") from None
    except StreamError as exc:
        raise AuthenticationError(f"{what}: {exc}") from None
    except (socket.timeout, TimeoutError):
        raise AuthenticationError(f"{what}: no complete {sec.mode} handshake within {timeout:g} s "
                                  f"({timeout_flag})") from None
    except (EOFError, ConnectionError, OSError) as exc:
        detail = "the peer closed the connection" if isinstance(exc, EOFError) else (exc.strerror or str(exc))
        raise AuthenticationError(f"{what}: {detail} during the {sec.mode} handshake (it may have refused "
                                  "our credentials)") from None


RETRY_FIRST = 0.2      # seconds before the first new try after the receiver dropped us unauthenticated
RETRY_MAX = 2.0        # the longest pause between two tries


_DROPPED = (errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ENOTCONN)


class _DroppedBeforeAuthentication(Exception):
    """The receiver closed the connection before the TLS handshake was done: its admission limits
    (blocktrack.acceptor: too many unauthenticated connections from our address, the oldest of them
    making way) refused or evicted us. Nothing was decided about our credentials: worth a new try."""


def connect_channel(address: str, sec: Security) -> SocketChannel:
    """Connect to a receiver, authenticate as ``sec`` says, return the channel (nothing sent yet).

    A connection the receiver closes before the TLS handshake is done is tried again, with pauses
    from RETRY_FIRST doubling to RETRY_MAX, for as long as ``sec.stall_timeout`` allows: a receiver
    whose port is crowded by connections that never authenticate drops them (and sometimes us) to
    make way, and the real sender must get through all the same. A refused TCP connection (nothing
    listens), a certificate or key that is refused, and a timeout are not retried."""
    host, port = parse_host_port(address)
    key = psk.read_key_file(sec.psk_file) if sec.mode == "psk" else None
    deadline = time.monotonic() + sec.stall_timeout
    pause, tries = RETRY_FIRST, 0
    while True:
        tries += 1
        try:
            return _connect_once(address, host, port, sec, key)
        except _DroppedBeforeAuthentication as exc:
            if time.monotonic() + pause >= deadline:
                raise AuthenticationError(
                    f"TLS to {address}: the receiver closed the connection before the handshake was done, "
                    f"{tries} time(s) in {sec.stall_timeout:g} s (--stall-timeout; last: {exc}): it refuses "
                    "connections from this address (too many unauthenticated ones: see its "
                    "--max-handshakes-per-address) or is not a blocktrack receiver") from None
        time.sleep(pause)
        pause = min(pause * 2, RETRY_MAX)


def _connect_once(address: str, host: str, port: int, sec: Security, key) -> SocketChannel:
    try:
        sock = socket.create_connection((host, port), timeout=sec.stall_timeout)
    except OSError as exc:
        if exc.errno in _DROPPED:      # accepted and reset at once: an admission limit
            raise _DroppedBeforeAuthentication(exc.strerror or str(exc)) from None
        raise PeerError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    try:
        _tune(sock, sec)
        if sec.mode != "insecure":
            ctx, _ = _context(sec, server=False)
            try:
                tls = ctx.wrap_socket(sock, server_hostname=host if sec.mode == "cert" else None,
                                      do_handshake_on_connect=False)
            except OSError as exc:
                if exc.errno in _DROPPED:  # reset before the first TLS byte (ssl probes the socket)
                    raise _DroppedBeforeAuthentication(exc.strerror or str(exc)) from None
                raise PeerError(f"cannot connect to {address}: {exc.strerror or exc}") from None
            sock = tls
            tls.settimeout(sec.stall_timeout)
            bound = {"timeout": sec.stall_timeout, "timeout_flag": "--stall-timeout"}
            _handshake_errors(f"TLS to {address}", sec, lambda: _tls_handshake(tls), **bound)
            if key is not None:
                _handshake_errors(f"authentication with {address}", sec, lambda: psk.prove(tls, key), **bound)
        scheme = {"insecure": "tcp", "cert": "tls", "psk": "tls+psk"}[sec.mode]
        return SocketChannel(sock, f"{scheme}:{address}", stall_timeout=sec.stall_timeout, peer="the receiver")
    except BaseException:
        sock.close()
        raise


def _tls_handshake(tls: ssl.SSLSocket) -> None:
    """The client's TLS handshake; the peer closing before it is done is _DroppedBeforeAuthentication
    (a refusal of our credentials comes as a TLS alert instead, an SSLError that is not retried)."""
    try:
        tls.do_handshake()
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError) as exc:
        raise _DroppedBeforeAuthentication(str(exc) or type(exc).__name__) from None
    except OSError as exc:
        if exc.errno in _DROPPED:
            raise _DroppedBeforeAuthentication(exc.strerror or str(exc)) from None
        raise


def accept_channel(listener: Listener, sec: Security, *, on_refused=None) -> SocketChannel:
    """Accept connections on ``listener`` and authenticate them side by side (blocktrack.acceptor);
    return the channel of the first that authenticates. Nothing of the stream is read.

    A connection that fails authentication, or does not finish it within the handshake timeout, is
    closed; with ``on_refused`` (called with the reason) the listener goes on, so a port scan, idle
    connections or a sender with the wrong key cannot end a receiver that waits for the right one.
    Without it, the first failure is raised. The listening socket is closed in either case."""
    key = psk.read_key_file(sec.psk_file) if sec.mode == "psk" else None
    ctx, own_der = _context(sec, server=True) if sec.mode != "insecure" else (None, None)

    def authenticate(conn: socket.socket, handshake: acceptor.Handshake) -> SocketChannel:
        return _authenticate(conn, handshake, sec, ctx, own_der, key)

    return acceptor.accept_first(listener.sock, authenticate, sec.handshakes, on_refused=on_refused)


def _authenticate(conn: socket.socket, handshake: acceptor.Handshake, sec: Security, ctx, own_der,
                  key) -> SocketChannel:
    where = handshake.where
    bound = {"timeout": sec.handshakes.timeout, "timeout_flag": "--handshake-timeout"}
    try:
        _tune(conn, sec)
        # A source refused a moment ago waits its pause before its next handshake starts.
        _handshake_errors(f"connection from {where}", sec, handshake.hold_back, **bound)
        if ctx is not None:
            tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            conn = tls
            # Each wait is bounded too; the accept loop ends the whole handshake at its deadline.
            tls.settimeout(max(0.01, handshake.remaining()))
            _handshake_errors(f"TLS from {where}", sec, tls.do_handshake, **bound,
                              credentials_refused=handshake.credentials_refused)
            if key is not None:
                tls.settimeout(max(0.01, handshake.remaining()))
                _handshake_errors(f"authentication of {where}", sec,
                                  lambda: psk.serve(tls, key, own_der, turn=handshake.turn), **bound)
        scheme = {"insecure": "tcp", "cert": "tls", "psk": "tls+psk"}[sec.mode]
        return SocketChannel(conn, f"{scheme}:{where}", stall_timeout=sec.stall_timeout, peer="the sender")
    except BaseException:
        conn.close()
        raise


def _tune(sock: socket.socket, sec: Security) -> None:
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)
        except OSError:
            pass
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    set_keepalive(sock, sec.stall_timeout)


# -- ssh ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SshTarget:
    user: str | None
    host: str
    port: int | None
    command: str  # the remote blocktrack executable

    @property
    def label(self) -> str:
        return f"ssh:{self.user + '@' if self.user else ''}{self.host}"


def is_ssh_url(text: str) -> bool:
    return text.startswith("ssh://")


def parse_ssh_url(text: str) -> SshTarget:
    """``ssh://[user@]host[:port][/path/to/blocktrack]``."""
    parts = urllib.parse.urlsplit(text)
    if parts.scheme != "ssh" or not parts.hostname:
        raise UsageError(f"expected ssh://[USER@]HOST[:PORT][/PATH-TO-BLOCKTRACK], got {text!r}")
    if parts.query or parts.fragment or parts.password:
        raise UsageError(f"{text!r}: no password, query or fragment in an ssh:// address")
    host = parts.hostname
    if host.startswith("-") or (parts.username or "").startswith("-"):
        raise UsageError(f"{text!r}: a host or user may not start with '-'")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"{text!r}: bad port") from None
    command = urllib.parse.unquote(parts.path) if parts.path not in ("", "/") else "blocktrack"
    return SshTarget(urllib.parse.unquote(parts.username) if parts.username else None, host, port, command)


def ssh_argv(target: SshTarget, remote_args: list[str], *, stall_timeout: float,
             options: list[str] = ()) -> list[str]:
    """The ssh command line (a list: no local shell); the remote words are each shell-quoted."""
    # ssh keeps the first value it gets for an option: BatchMode (never prompt) comes first, then the
    # operator's --ssh-option values, then our defaults, which those may override: ssh's own
    # keep-alive and connect timeout find a dead network path within about the stall timeout.
    argv = ["ssh", "-T", "-e", "none", "-o", "BatchMode=yes"]
    for option in options:
        argv += ["-o", option]
    argv += ["-o", f"ServerAliveInterval={max(1, int(stall_timeout / 3))}", "-o", "ServerAliveCountMax=3",
             "-o", f"ConnectTimeout={max(1, int(stall_timeout))}"]
    if target.port is not None:
        argv += ["-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    remote = " ".join(shlex.quote(word) for word in [target.command, *remote_args])
    return argv + ["--", target.host, remote]


class SshChannel(PipeChannel):
    """``blocktrack receive --input -`` on the far host: its stdin is our stream, its stdout the replies.

    ssh's stderr (and the remote command's) goes to ours, so the remote receiver's own error message
    reaches the operator as it wrote it."""

    def __init__(self, target: SshTarget, remote_args: list[str], *, stall_timeout: float, options=()):
        argv = ssh_argv(target, remote_args, stall_timeout=stall_timeout, options=list(options))
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        except OSError as exc:
            raise PeerError(f"cannot run ssh: {exc.strerror or exc}") from None
        super().__init__(self.proc.stdout.fileno(), self.proc.stdin.fileno(), target.label,
                         stall_timeout=stall_timeout, peer="the remote receiver")
        self.argv = argv

    def finish(self, timeout: float) -> int | None:
        """Close our end of the stream and wait for the remote command; its exit status (None: killed)."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def _end_output(self) -> None:
        try:
            self.proc.stdin.close()  # EOF on the remote receiver's stdin
        except OSError:
            pass

    def shutdown(self) -> None:
        """End our side (EOF on the remote stdin): the remote receiver finishes or fails and exits, and
        its stdout ends, waking our reader. Not a kill: after a verdict it still saves its state."""
        super().shutdown()
        self.end_output()

    def restore(self) -> None:
        pass  # our own pipes: nobody else shares them (and their fds may be closed already)

    def close(self) -> None:
        self.shutdown()
        if self.proc.poll() is None:
            self.finish(5)
        try:
            self.proc.stdout.close()
        except OSError:
            pass
