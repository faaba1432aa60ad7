"""The `layerprune` command: each subcommand parses its options, calls the library verbs that a
Python user would call (layerprune/api.py), and prints. No pruning logic lives here.

One module per subcommand holds its options (`add_parser`) and its command (`cmd_*`); what they
share is in common.py, the torchrun set-up in spread.py.

Every error a user can cause is printed on one line that names the fix, with exit code 2. Ctrl-C
and SIGTERM (what `timeout`, `docker stop` and Slurm send) unwind alike, removing temporaries, and
exit 130 and 143.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from ..errors import LayerpruneError
from . import apply, demo, evaluate, export, info, plan, recover, report, score, spread
from .common import Parser

SUBCOMMANDS = (info, evaluate, score, plan, apply, recover, export, demo, report)  # the order of --help


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = Parser(
        prog="layerprune",
        description="Decide, layer by layer, how to prune a causal LM; apply, recover and measure the result.",
    )
    parser.add_argument("--version", action="version", version=f"layerprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the command is, so that it unwinds as Ctrl-C does: every `finally`,
    `with` and `except BaseException` on the way removes its temporaries."""


_SIGNALLED: list[int] = []  # the exit code of the signal that interrupted this command: 143, 130


def _interrupt(signum, frame) -> None:
    if signum == signal.SIGTERM:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
        _SIGNALLED.append(143)
        raise Terminated
    _SIGNALLED.append(130)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    main_thread = threading.current_thread() is threading.main_thread()  # signals go to the main thread
    previous = (
        {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    )
    _SIGNALLED.clear()
    try:
        args = build_parser().parse_args(argv)
        spread.prepare(args)
        return args.func(args)
    except LayerpruneError as e:
        if _SIGNALLED:
            return _interrupted()
        print(f"layerprune: error: {e}", file=sys.stderr)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated)
        return _interrupted()
    except BrokenPipeError:  # `layerprune ... | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # a path the user gave: unwritable, a folder where a file was expected, a full disk
        if _SIGNALLED:
            return _interrupted()
        where = f" {e.filename}" if e.filename else ""
        print(
            f"layerprune: error: {e.strerror or e}:{where}; check the path and its permissions",
            file=sys.stderr,
        )
    except Exception:
        if not _SIGNALLED:
            raise
        # a library caught the interruption and raised an error of its own on the way out (safetensors,
        # interrupted in torch.UntypedStorage.from_file, tries another storage and fails with ValueError)
        return _interrupted()
    finally:
        # the process group of a torchrun job, where a command opened one (so --help never imports torch)
        if "layerprune.distributed" in sys.modules:
            sys.modules["layerprune.distributed"].close()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    return 2


def _interrupted() -> int:
    print("layerprune: interrupted", file=sys.stderr)
    return _SIGNALLED[0] if _SIGNALLED else 130
