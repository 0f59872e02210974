"""``blocktrack release``: end the freeze that follows a verified cutover (thaw, or retire for good)."""

from __future__ import annotations

import argparse
import json
import sys

from blocktrack.errors import BlocktrackError, PeerError, UsageError
from blocktrack.migrate import control
from blocktrack.migrate.savedstate import SourceState, source_folder, state_root

DESCRIPTION = """\
After `blocktrack migrate` verified its cutover, the source stays frozen: new writes are
held (not applied, not lost) so that nothing can silently diverge from the target. This
command ends that state, through the running migration's control socket:

  (default)  thaw: the held writes and every later write reach the source again. The source
             then differs from the target: do this only when the target is not taken into use
             (a rollback), or for a source that is no longer the primary copy.
  --retire   every held and later write fails (EPERM); the source never changes again and
             the migration's NBD server stops.

The answer says how many requests were held and what happened to them."""


def register(subparsers) -> None:
    parser = subparsers.add_parser("release", help="thaw or retire a source frozen by a verified migration",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("device", metavar="DEVICE", help="the device or file given to `blocktrack migrate`")
    parser.add_argument("--retire", action="store_true", help="refuse writes forever instead of thawing")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="blocktrack's state directory, as given to migrate (default $BLOCKTRACK_STATE_DIR, "
                             "else /var/lib/blocktrack)")
    parser.add_argument("--json", action="store_true", help="print the answer as one JSON line")
    parser.set_defaults(run=run)


def run(args) -> int:
    folder = source_folder(state_root(args.state_dir), args.device)
    state = SourceState.load(folder)
    if state is None:
        raise UsageError(f"no migration of {args.device} is recorded in {folder.parent}")
    if state.phase in ("released", "retired"):
        raise UsageError(f"the migration of {args.device} ({state.migration_id}) was already {state.phase}")
    if state.phase == "closed" and state.backend != "nbd":
        state.phase = "frozen"          # a dm source stays suspended when its migrate is stopped: release it
    if state.phase == "closed":
        raise UsageError(f"the migration of {args.device} ({state.migration_id}) stopped while frozen: its held "
                         "writes were refused and nothing reached the source; there is nothing to release")
    if state.phase != "frozen":
        raise UsageError(f"the migration of {args.device} ({state.migration_id}) did not cut over (it is "
                         f"{state.phase}): there is nothing to release; continue it with `blocktrack migrate --resume`")
    mode = "retire" if args.retire else "thaw"
    try:
        answer = control.request(folder / "control.sock", {"op": "release", "mode": mode})
    except PeerError as exc:
        if state.backend != "nbd":
            answer = _release_directly(args, state, folder, mode)
        else:
            raise PeerError(f"{exc} (pid {state.pid}); while it is not running nothing serves {args.device}, so no "
                            "write can reach it") from None
    if not answer.get("ok"):
        raise BlocktrackError(f"release refused: {answer.get('error')}")
    if args.json:
        sys.stdout.write(json.dumps({"event": "released", "device": args.device,
                                     "migration_id": state.migration_id, **answer}, sort_keys=True) + "\n")
    else:
        sys.stdout.write(f"blocktrack release: {answer['message']}\n")
    sys.stdout.flush()
    return 0


def _release_directly(args, state, folder, mode: str) -> dict:
    """The migrate that froze an enrolled (dm) source is gone, but the kernel still holds the LV
    suspended: release it here, through its backend."""
    from blocktrack import backends
    from blocktrack.migrate.enrolled_source import release_enrolled
    from blocktrack.state import StateDir

    tracker = backends.open_backend(args.device, StateDir(args.state_dir))
    info = release_enrolled(tracker, mode)
    state.phase = "released" if mode == "thaw" else "retired"
    state.save(folder)
    if mode == "thaw":
        message = (f"thawed {args.device} (its migrate {state.pid} was gone): writes reach it again, and it now "
                   f"differs from the target of migration {state.migration_id}")
    else:
        message = f"retired {args.device}: an error table replaced it; every held and later write fails"
    return {"ok": True, "mode": mode, **info, "message": message}
