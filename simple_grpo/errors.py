"""The one exception type that means "the user must change something"; entry points print its
message as a single line and exit with code 2 instead of showing a traceback."""


import sys
import threading


class UserError(Exception):
    """A bad option, a missing file, an unreachable server: a one-line message naming the fix."""


_TERMINATED = threading.Event()  # set by run_entry_point's SIGTERM handler


def exit_if_terminated() -> None:
    """Exit 143 at a safe point (a step boundary) when a SIGTERM arrived but its SystemExit was
    lost: a handler's exception raised inside a weakref callback or __del__ (tqdm's WeakSet, for
    one) is swallowed by Python, which would keep training."""
    if _TERMINATED.is_set():
        sys.exit(143)


def first_report(line: str, fresh_s: float = 120.0) -> bool:
    """Whether this process is the first of its launch on this host to print `line`. Under
    torchrun or deepspeed (RANK set, WORLD_SIZE > 1) every rank meets the same bad option and
    would print the same line: the first rank to claim a marker file named by the launch (the
    launcher's pid, MASTER_PORT) and the line prints it, the others stay quiet (a line only one
    rank meets, such as its own disk's error, still prints). Markers older than `fresh_s` are
    another launch's, and the rank that claims one removes them."""
    import glob
    import hashlib
    import os
    import tempfile
    import time

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    launch = f"{os.getppid()}:{os.environ.get('MASTER_PORT', '')}:{line}"
    path = os.path.join(tempfile.gettempdir(),
                        f"simple_grpo-said-{hashlib.sha256(launch.encode()).hexdigest()[:24]}")
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            for old in glob.glob(os.path.join(tempfile.gettempdir(), "simple_grpo-said-*")):
                try:  # earlier launches' markers go, so they do not pile up in the temp folder
                    if time.time() - os.path.getmtime(old) >= fresh_s:
                        os.unlink(old)
                except OSError:
                    pass
            return True
        except FileExistsError:
            try:
                if time.time() - os.path.getmtime(path) < fresh_s:
                    return False
                os.unlink(path)  # an earlier launch's marker: claim it again
            except FileNotFoundError:
                pass
        except OSError:  # no writable temp folder: print, as without a launcher
            return True
    return True


# how gloo and NCCL report a collective whose peer process is gone
_PEER_MARKERS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                 "NCCL communicator was aborted", "ProcessGroupNCCL's watchdog", "remote process exited")


def lost_peer(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank of the run ended (killed, or
    stopped by its own error), or None for any other exception. Under a launcher the rank that
    ended first printed its own line (or the launcher's "Root Cause" names it)."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch.distributed as dist

    text = str(e)
    if not (isinstance(e, getattr(dist, "DistError", ())) or
            (isinstance(e, RuntimeError) and any(m in text for m in _PEER_MARKERS))):
        return None
    reason = next((m for m in _PEER_MARKERS if m in text), type(e).__name__)
    return (f"rank {os.environ.get('RANK', '?')} stops: another rank of this run ended during a "
            f"collective ({reason}); that rank's own line is above (or the launcher's Root Cause)")


def run_entry_point(main, argv: list[str], prog: str):
    """Run an entry script's `main(argv)` the way users see it: a UserError is one line on stderr
    and exit code 2, Ctrl-C exits 130 without a traceback, SIGTERM runs the cleanups (exit 143),
    a file-size limit (ulimit -f) makes writes fail with EFBIG instead of killing the process
    (SIGXFSZ), and warnings of the simple_grpo loggers print as whole lines above progress bars."""
    import logging
    import signal

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    def on_sigterm(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not interrupt cleanups
        _TERMINATED.set()
        sys.exit(143)  # atexit cleanups still run

    def unraisable(info):  # our SystemExit swallowed in a callback: exit_if_terminated exits later
        if not (_TERMINATED.is_set() and info.exc_type is SystemExit):
            sys.__unraisablehook__(info)

    signal.signal(signal.SIGTERM, on_sigterm)
    sys.unraisablehook = unraisable
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(f"{prog}: %(levelname)s: %(message)s"))
    logging.getLogger("simple_grpo").addHandler(console)

    def fail(message: str, code: int):
        for bar in list(getattr(tqdm, "_instances", ())):  # end the progress bar's line first
            bar.close()
        if first_report(f"{prog}: {message}"):
            print(f"{prog}: {message}", file=sys.stderr)
        sys.exit(code)

    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("simple_grpo")]):
            return main(argv)
    except UserError as e:
        fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 -- only a lost peer is turned into a line; the rest re-raised
        line = lost_peer(e)
        if line is None:
            raise
        fail(f"error: {line}", 1)
