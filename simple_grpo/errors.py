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
        print(f"{prog}: {message}", file=sys.stderr)
        sys.exit(code)

    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("simple_grpo")]):
            return main(argv)
    except UserError as e:
        fail(f"error: {e}", 2)
    except KeyboardInterrupt:
        fail("interrupted", 130)
