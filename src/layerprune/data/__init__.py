"""Text and token windows: text.py reads a source (bundled, local files, named datasets), windows.py
cuts it into token windows with a recorded protocol and holds each paper's calibration defaults."""

from .text import JOIN, NAMED, Text, json_lines, load_text, read_utf8
from .windows import (
    BOS_POLICIES,
    CALIBRATION_DEFAULTS,
    CalibrationSpec,
    Windows,
    calibration,
    calibration_windows,
    check_seqlen,
    check_vocab,
    default_bos,
    default_calibration_source,
    encode,
    eval_windows,
    resolve_calibration,
    windows_from_protocol,
)

__all__ = [
    "BOS_POLICIES",
    "CALIBRATION_DEFAULTS",
    "JOIN",
    "NAMED",
    "CalibrationSpec",
    "Text",
    "Windows",
    "calibration",
    "calibration_windows",
    "check_seqlen",
    "check_vocab",
    "default_bos",
    "default_calibration_source",
    "encode",
    "eval_windows",
    "json_lines",
    "load_text",
    "read_utf8",
    "resolve_calibration",
    "windows_from_protocol",
]
