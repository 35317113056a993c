"""The one error path of every command and module entry point.

Every failure ends as one markup-safe line on stderr (`error: ...`) and exit status 2; the traceback
only with `--debug` or `WSRA_DEBUG=1`.  Under `accelerate launch` the line is printed once: by the
first process to fail when a process group exists (a counter in its store), else by rank 0, so the
root cause is shown and not the other ranks' consequences of it.

Messages are data (file names, sentences, ids): they are never parsed as rich markup, so `[/b]` in a
query or `[v2]` in a path is printed as written.
"""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from typing import Callable, Iterator, NoReturn

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class WsraError(ValueError):
    """Base of the errors users can act on (bad input, bad recipe, a lost peer)."""


class UsageError(WsraError):
    """A command-line option value this command or machine cannot use (a device it does not have, a port out of
    range): one line naming the option, exit 2, like click's own usage errors."""


def debug_enabled() -> bool:
    return os.environ.get("WSRA_DEBUG", "").lower() not in ("", "0", "false", "no")


def _rank() -> int:
    for var in ("RANK", "LOCAL_RANK"):
        v = os.environ.get(var)
        if v is not None and v.strip().isdigit():
            return int(v)
    return 0


def _first_to_fail() -> bool | None:
    """True/False when the process group's store can tell who failed first; None when it cannot."""
    try:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        from datetime import timedelta

        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(timedelta(seconds=3))
        return int(store.add("wsra_dist/errors", 1)) == 1
    except Exception:  # the store died with its host: this process may be the only one left to say why
        return True


def should_print() -> bool:
    first = _first_to_fail()
    return first if first is not None else _rank() == 0


def describe(exc: BaseException) -> str:
    """One line for the user: known errors as their message, others labelled with their type."""
    from .config import ConfigError
    from .data.records import DataError

    from .peers import explain

    lost = explain(exc)
    if lost:
        return lost
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, (WsraError, DataError, ConfigError)):
        return msg
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in msg:
        return f"{exc.filename}: no such file or directory"
    if isinstance(exc, OSError) and exc.filename:
        where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
        reason = exc.strerror or msg
        return reason if where in reason else f"{where}: {reason}"
    if isinstance(exc, (ValueError, OSError, KeyError)):
        return msg.strip("'\"") if isinstance(exc, KeyError) else msg
    return f"internal error ({type(exc).__name__}): {msg} (set WSRA_DEBUG=1 or pass --debug for the traceback)"


def print_error(text: str, label: str = "error") -> None:
    from rich.console import Console
    from rich.text import Text

    line = Text(f"{label}: ", style="bold red")
    line.append(text)  # appended as plain text: no markup is interpreted
    Console(stderr=True, soft_wrap=True, highlight=False).print(line)


def print_warning(text: str) -> None:
    from rich.console import Console
    from rich.text import Text

    line = Text("warning: ", style="bold yellow")
    line.append(text)
    Console(stderr=True, soft_wrap=True, highlight=False).print(line)


def report(exc: BaseException, debug: bool | None = None) -> int:
    """Print `exc` the one way (once across processes) and return the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        if _rank() == 0:
            print_error("interrupted", label="stopped")
        return EXIT_INTERRUPTED
    debug = debug_enabled() if debug is None else debug
    if should_print():
        if debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        print_error(describe(exc))
    return EXIT_ERROR


@contextmanager
def errors_exit(debug: bool | None = None) -> Iterator[None]:
    """`with errors_exit(): main()` -- any exception becomes one line and exit status 2."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place that turns every failure into an exit
        sys.exit(report(e, debug))


def run_typer(app: Callable, args: list[str] | None = None) -> NoReturn:
    """Run a typer app with the one error path.  click's usage errors (an unknown option, a missing one, a bad
    choice) are one line too, `error: No such option: --device (see wsra-dist evaluate --help)`, exit 2: in its
    standalone mode click prints a block of four lines (usage, "Try ... --help", a blank line, "Error: ...")."""
    import typer  # its click (typer 0.29 vendors one: typer._click) raises TyperExceptions

    argv = list(sys.argv[1:] if args is None else args)
    if "--debug" in argv:  # global flag, accepted anywhere on the line
        argv.remove("--debug")
        os.environ["WSRA_DEBUG"] = "1"
    with errors_exit():
        try:  # not standalone: click raises its errors here; typer.Exit(n) returns n
            rv = app(args=argv, prog_name="wsra-dist", standalone_mode=False)
        except typer.TyperException as e:
            kinds = {c.__name__ for c in type(e).__mro__}  # by name: the classes live in typer's private module
            if "NoArgsIsHelpError" in kinds:  # `wsra-dist shard` alone: its help, as before
                e.show()
            elif "UsageError" in kinds:
                ctx = getattr(e, "ctx", None)
                msg = " ".join(e.format_message().split())  # "Choose from:\n\tdidemo,\n\t..." on one line
                print_error(msg + (f" (see {ctx.command_path} --help)" if ctx is not None else ""))
            else:
                print_error(" ".join(e.format_message().split()))
            sys.exit(getattr(e, "exit_code", EXIT_ERROR))
        except typer.Abort:
            print_error("aborted", label="stopped")
            sys.exit(1)
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
