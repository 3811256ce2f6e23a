"""User-facing errors: each names the offending key or file and says how to fix it.

The launchers catch `DistillError`, print its message once (rank 0 prefix) and exit with code 2, so a bad config
or bad data never produces a bare traceback or overwrites anything.
"""
import logging
import os
import sys
import traceback
from typing import Callable, Optional



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


def run_collective(body: Callable[[], int], on_error: Callable[["DistillError"], int],
                   shutdown: Optional[Callable[..., None]] = None,
                   on_other: Optional[Callable[[Exception], Optional[int]]] = None) -> int:
    """An entry point's work on the process group, and the group's end however the work ends (`shutdown`:
    engines.shutdown; None when no group was started). Returns body()'s code (0: a clean end with the closing
    barrier), or on_error's for a DistillError (the barrier only when every rank raised it together:
    DistillError.shared), or on_other's for another exception when it gives a code (else the exception goes on).
    After any failure but a shared error there is no closing barrier: a peer may be dead or in another collective."""
    failed, intact = True, False
    try:
        code = body()
        failed = code != 0
        return code
    except DistillError as e:
        intact = e.shared
        return on_error(e)
    except Exception as e:
        code = on_other(e) if on_other is not None else None
        if code is None:
            raise
        return code
    finally:
        if shutdown is not None:
            shutdown(failed=failed, group_intact=intact)


def rank_error(e: "DistillError", rank: Optional[int] = None) -> int:
    """Print `e` as this rank's error (every rank prints its own) and return exit code 2."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    print(f"[ds_distill] error (rank {rank}): {e}", file=sys.stderr, flush=True)
    return 2


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
