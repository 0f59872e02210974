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
  certificate (layout in wire/control.py, "pre-shared-key authentication"). A man in the middle
  must present its own certificate, so proofs it relays name the wrong one and fail.
* plain TCP only with ``--insecure`` (both ends): for a test, or a link that is already private.

Failures of authentication are AuthenticationError (exit 5 for the sender), raised before the
receiver reads a HELLO or a stream byte, so nothing can reach a target; the receiver reports the
refused connection and goes on waiting for an authenticated one (accept_channel). TLS sockets become transport.SocketChannel
(non-blocking, one SSL call at a time, stall timeouts); the TLS and PSK handshakes themselves run
blocking with the stall timeout as their deadline.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shlex
import socket
import ssl
import stat
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass

from blocktrack.errors import AuthenticationError, PeerError, StreamError, UsageError
from blocktrack.transport import Listener, PipeChannel, SocketChannel, parse_host_port, set_keepalive
from blocktrack.wire import control as C

DEFAULT_STALL_TIMEOUT = 60.0
_SOCKET_BUFFER = 4 << 20
_MIN_PSK_BYTES = 16


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

    @property
    def mode(self) -> str:
        return "insecure" if self.insecure else "psk" if self.psk_file else "cert"


SECURITY_HELP = """\
authentication of direct TCP (both ends must agree):
  --tls-cert/--tls-key/--tls-ca   TLS 1.3, mutual: each end shows a certificate signed by the CA
  --psk-file FILE                 TLS 1.3, and both ends prove they hold the key in FILE
                                  (>= 16 bytes, not readable by group or others)
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
                       help="authenticate both ends with the pre-shared key in FILE (at least 16 bytes, mode "
                            "0600), inside TLS 1.3")
    group.add_argument("--insecure", action="store_true",
                       help="allow plain TCP: no authentication, no encryption (tests, private links)")
    group.add_argument("--stall-timeout", type=float, default=DEFAULT_STALL_TIMEOUT, metavar="SECONDS",
                       help=f"give up (exit 5) when the peer sends nothing, or takes nothing, for this long; "
                            f"keep-alives keep an idle but healthy link open (default {DEFAULT_STALL_TIMEOUT:g})")


def from_args(args, *, tcp: bool) -> Security:
    """Validate the security options; ``tcp`` says whether a TCP connection will be made."""
    if args.stall_timeout <= 0:
        raise UsageError("--stall-timeout must be positive (seconds)")
    tls = [args.tls_cert, args.tls_key, args.tls_ca]
    chosen = sum([any(tls), bool(args.psk_file), bool(args.insecure)])
    if not tcp:
        if any(tls) or args.psk_file or args.insecure:
            raise UsageError("--tls-*, --psk-file and --insecure apply to direct TCP only (ssh and pipes "
                             "bring their own security)")
        return Security(stall_timeout=args.stall_timeout)
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
        read_psk(args.psk_file)  # a bad key file is a usage error now, not after listening
    return Security(args.tls_cert, args.tls_key, args.tls_ca, args.psk_file, bool(args.insecure),
                    args.stall_timeout)


def read_psk(path: str) -> bytes:
    try:
        info = os.stat(path)
        with open(path, "rb") as f:
            key = f.read(65536).strip()
    except OSError as exc:
        raise UsageError(f"cannot read --psk-file {path}: {exc.strerror}") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UsageError(f"--psk-file {path} is readable by group or others (mode "
                         f"{stat.S_IMODE(info.st_mode):04o}): chmod 600 it")
    if len(key) < _MIN_PSK_BYTES:
        raise UsageError(f"--psk-file {path} holds {len(key)} bytes; use at least {_MIN_PSK_BYTES} random bytes "
                         "(e.g. `openssl rand -hex 32`)")
    return key


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


def _psk_mac(key: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes, cert_der: bytes) -> bytes:
    return hmac.new(key, label + server_nonce + client_nonce + hashlib.sha256(cert_der).digest(),
                    hashlib.sha256).digest()


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = sock.recv(n - len(buf))
        if not piece:
            raise EOFError
        buf += piece
    return bytes(buf)


def _psk_server(sock: ssl.SSLSocket, key: bytes, cert_der: bytes) -> None:
    server_nonce = os.urandom(C.PSK_NONCE_LEN)
    sock.sendall(C.PSK_CHALLENGE.pack(C.PSK_MAGIC, server_nonce))
    client_nonce, proof = C.decode_psk(C.PSK_PROOF, _recv_exact(sock, C.PSK_PROOF.size))
    if not hmac.compare_digest(proof, _psk_mac(key, C.PSK_LABEL_CLIENT, server_nonce, client_nonce, cert_der)):
        try:
            sock.sendall(C.PSK_VERDICT.pack(C.PSK_MAGIC, C.PSK_REFUSED, bytes(32)))
        except OSError:
            pass
        raise AuthenticationError("the sender does not hold the pre-shared key (--psk-file): refused before "
                                  "any stream byte was read")
    sock.sendall(C.PSK_VERDICT.pack(C.PSK_MAGIC, C.PSK_ACCEPTED,
                                    _psk_mac(key, C.PSK_LABEL_SERVER, server_nonce, client_nonce, cert_der)))


def _psk_client(sock: ssl.SSLSocket, key: bytes) -> None:
    (server_nonce,) = C.decode_psk(C.PSK_CHALLENGE, _recv_exact(sock, C.PSK_CHALLENGE.size))
    client_nonce = os.urandom(C.PSK_NONCE_LEN)
    cert_der = sock.getpeercert(binary_form=True)
    sock.sendall(C.PSK_PROOF.pack(C.PSK_MAGIC, client_nonce,
                                  _psk_mac(key, C.PSK_LABEL_CLIENT, server_nonce, client_nonce, cert_der)))
    status, server_proof = C.decode_psk(C.PSK_VERDICT, _recv_exact(sock, C.PSK_VERDICT.size))
    if status != C.PSK_ACCEPTED:
        raise AuthenticationError("the receiver refused our pre-shared key (--psk-file): the two ends hold "
                                  "different keys")
    expected = _psk_mac(key, C.PSK_LABEL_SERVER, server_nonce, client_nonce, cert_der)
    if not hmac.compare_digest(server_proof, expected):
        raise AuthenticationError("the receiver could not prove it holds the pre-shared key (--psk-file): "
                                  "not sending to it")


def _handshake_errors(what: str, sec: Security, step):
    try:
        return step()
    except ssl.SSLCertVerificationError as exc:
        raise AuthenticationError(f"{what}: certificate not accepted: {exc.verify_message or exc.reason}") from None
    except ssl.SSLError as exc:
        raise AuthenticationError(f"{what}: TLS handshake failed ({exc.reason or exc}); do both ends use "
                                  "the same kind of authentication and trusted CAs?") from None
    except StreamError as exc:
        raise AuthenticationError(f"{what}: {exc}") from None
    except (socket.timeout, TimeoutError):
        raise AuthenticationError(f"{what}: no answer to the {sec.mode} handshake within "
                                  f"{sec.stall_timeout:g} s") from None
    except (EOFError, ConnectionError, OSError) as exc:
        detail = "the peer closed the connection" if isinstance(exc, EOFError) else (exc.strerror or str(exc))
        raise AuthenticationError(f"{what}: {detail} during the {sec.mode} handshake (it may have refused "
                                  "our credentials)") from None


def connect_channel(address: str, sec: Security) -> SocketChannel:
    """Connect to a receiver, authenticate as ``sec`` says, return the channel (nothing sent yet)."""
    host, port = parse_host_port(address)
    key = read_psk(sec.psk_file) if sec.mode == "psk" else None
    try:
        sock = socket.create_connection((host, port), timeout=sec.stall_timeout)
    except OSError as exc:
        raise PeerError(f"cannot connect to {address}: {exc.strerror or exc}") from None
    try:
        _tune(sock, sec)
        if sec.mode != "insecure":
            ctx, _ = _context(sec, server=False)
            tls = ctx.wrap_socket(sock, server_hostname=host if sec.mode == "cert" else None,
                                  do_handshake_on_connect=False)
            sock = tls
            tls.settimeout(sec.stall_timeout)
            _handshake_errors(f"TLS to {address}", sec, tls.do_handshake)
            if key is not None:
                _handshake_errors(f"authentication with {address}", sec, lambda: _psk_client(tls, key))
        scheme = {"insecure": "tcp", "cert": "tls", "psk": "tls+psk"}[sec.mode]
        return SocketChannel(sock, f"{scheme}:{address}", stall_timeout=sec.stall_timeout, peer="the receiver")
    except BaseException:
        sock.close()
        raise


def accept_channel(listener: Listener, sec: Security, *, on_refused=None) -> SocketChannel:
    """Accept a connection on ``listener`` and authenticate it; nothing of the stream is read.

    A connection that fails authentication is closed; with ``on_refused`` (called with the reason)
    the listener then waits for the next one, one second later, so a port scan or a sender with the
    wrong key cannot end a receiver that waits for the right one, and guessing is slow. Without it,
    the failure is raised."""
    key = read_psk(sec.psk_file) if sec.mode == "psk" else None
    ctx, own_der = _context(sec, server=True) if sec.mode != "insecure" else (None, None)
    while True:
        conn, peer = listener.sock.accept()
        try:
            channel = _authenticate(conn, f"{peer[0]}:{peer[1]}", sec, ctx, own_der, key)
        except AuthenticationError as exc:
            if on_refused is None:
                listener.sock.close()
                raise
            on_refused(str(exc))
            time.sleep(REFUSAL_PAUSE)
            continue
        except BaseException:
            listener.sock.close()
            raise
        listener.sock.close()
        return channel


REFUSAL_PAUSE = 1.0


def _authenticate(conn: socket.socket, where: str, sec: Security, ctx, own_der, key) -> SocketChannel:
    try:
        _tune(conn, sec)
        if ctx is not None:
            tls = ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
            conn = tls
            tls.settimeout(sec.stall_timeout)
            _handshake_errors(f"TLS from {where}", sec, tls.do_handshake)
            if key is not None:
                _handshake_errors(f"authentication of {where}", sec, lambda: _psk_server(tls, key, own_der))
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
