"""The one exception type that means "the user must change something"; entry points print its
message as a single line and exit with code 2 instead of showing a traceback."""


class UserError(Exception):
    """A bad option, a missing file, an unreachable server: a one-line message naming the fix."""


def run_entry_point(main, argv: list[str], prog: str):
    """Run an entry script's `main(argv)` the way users see it: a UserError is one line on stderr
    and exit code 2, Ctrl-C exits 130 without a traceback, SIGTERM runs the cleanups (exit 143),
    a file-size limit (ulimit -f) makes writes fail with EFBIG instead of killing the process
    (SIGXFSZ), and warnings of the simple_grpo loggers print as whole lines above progress bars."""
    import logging
    import signal
    import sys

    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    def on_sigterm(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not interrupt cleanups
        sys.exit(143)  # atexit cleanups still run

    signal.signal(signal.SIGTERM, on_sigterm)
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
