"""Reading a small TOML file, with one way to say what is wrong: a line and a reason, never
a value from the file (a key pasted into the wrong place must not reach a log).

It lives in grants, the lowest layer, so that the grants loader and broker's readers of
config.toml and profiles.toml share it: broker may import grants, never the reverse.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

# The files are small and owner-written; the cap keeps a mistaken path (a log, a disk
# image) from being read whole.
MAX_FILE_BYTES = 1 << 20
_TOML_POSITION = re.compile(r"(.*) \(at (?:line (\d+), column (\d+)|end of document)\)", re.S)


class TomlFileError(ValueError):
    """What is wrong with a TOML file: a reason, and its 1-based line where one is known."""

    def __init__(self, reason: str, line: int | None = None) -> None:
        super().__init__(reason, line)
        self.reason = reason
        self.line = line

    def __str__(self) -> str:
        return self.reason if self.line is None else f"line {self.line}: {self.reason}"


def read_text(path: Path) -> str | None:
    """The file's text; None when there is no file. A TomlFileError when it cannot be read,
    is larger than MAX_FILE_BYTES or is not UTF-8."""
    try:
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise TomlFileError(f"cannot read the file: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TomlFileError(f"larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TomlFileError("not UTF-8 text", data[: e.start].count(b"\n") + 1) from None


def parse(text: str) -> dict[str, Any]:
    """`tomllib.loads`; each failure (bad syntax, an integer too long for Python, nesting
    too deep) a TomlFileError at the line tomllib names."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = _TOML_POSITION.fullmatch(str(e))
        if match is None:
            raise TomlFileError(f"invalid TOML: {e}") from None
        if match[2] is None:
            raise TomlFileError(f"invalid TOML: {match[1]} at end of file",
                                text.count("\n") + 1) from None
        raise TomlFileError(f"invalid TOML: {match[1]} at column {match[3]}",
                            int(match[2])) from None
    except ValueError as e:  # an integer literal longer than Python will convert
        raise TomlFileError(f"invalid TOML: {e}") from None
    except RecursionError:
        raise TomlFileError("invalid TOML: nested too deeply") from None
