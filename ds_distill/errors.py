"""User-facing errors: each names the offending key or file and says how to fix it.

The launchers catch `DistillError`, print its message once (rank 0 prefix) and exit with code 2, so a bad config
or bad data never produces a bare traceback or overwrites anything.
"""
import logging
import os
import sys
import traceback



class DistillError(Exception):
    """Base for every error the user can fix (bad config, bad data, bad model directory).

    `shared`: every rank raises this same error from a collective decision (or a check all ranks run on the same
    inputs), so rank 0 alone prints it. Otherwise each rank prints its own: an error only one rank saw is never
    hidden.
    """
    shared = False


class ConfigError(DistillError):
    """One or more config problems; `problems` lists every one as 'key: what is wrong -> fix'."""
    shared = True

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration ({len(self.problems)} problem(s)):\n{lines}")


class DataError(DistillError):
    """The data cannot be used as configured (empty, missing field, nothing trainable after truncation...)."""


class ModelError(DistillError):
    """A model or tokenizer directory cannot be used (missing, pickle-only weights, incompatible vocabularies)."""


class NonFiniteError(DistillError):
    """A non-finite loss or gradient norm was seen; the weights of the last good step were kept."""
    shared = True  # decided by one all-reduce


def exit_process(code: int) -> None:
    """The end of an entry point's process with exit code `code`. After a failure the interpreter's teardown is
    skipped (streams and log handlers flushed first): a process group left without its closing barrier can abort in
    its destructors (gloo: std::terminate, exit 250) and replace the code the user and the launcher should see."""
    if code:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(0)


def run_main(main) -> None:
    """`sys.exit(main())` for the launch/*.py entry points, ending through exit_process: an unexpected exception
    prints its traceback and exits 1 without the interpreter's teardown (as any other failure)."""
    try:
        code = main()
    except SystemExit:
        raise
    except BaseException:  # noqa: BLE001 -- printed here, as the interpreter would
        traceback.print_exc()
        code = 1
    exit_process(code)
