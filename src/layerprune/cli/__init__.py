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


def _terminate(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    main_thread = threading.current_thread() is threading.main_thread()  # signals go to the main thread
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        args = build_parser().parse_args(argv)
        spread.prepare(args)
        return args.func(args)
    except LayerpruneError as e:
        print(f"layerprune: error: {e}", file=sys.stderr)
    except Terminated:
        print("layerprune: interrupted", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("layerprune: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `layerprune ... | head`
        sys.stderr.close()
        return 0
    except OSError as e:  # a path the user gave: unwritable, a folder where a file was expected, a full disk
        where = f" {e.filename}" if e.filename else ""
        print(
            f"layerprune: error: {e.strerror or e}:{where}; check the path and its permissions",
            file=sys.stderr,
        )
    finally:
        # the process group of a torchrun job, where a command opened one (so --help never imports torch)
        if "layerprune.distributed" in sys.modules:
            sys.modules["layerprune.distributed"].close()
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
    return 2
