"""What every job's `__main__` does: parse the config, run `main(cfg)`, turn user errors into
one clear line on stderr and a non-zero exit."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel

from generalmodel import UserError
from generalmodel.config import parse_args

EXIT_USER_ERROR = 2


@contextlib.contextmanager
def user_errors_exit() -> Iterator[None]:
    """A UserError becomes `error: <message>` on stderr and exit code 2, without a traceback."""
    try:
        yield
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


def run_job(main: Callable[[Any], Any], cls: type[BaseModel], description: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with user_errors_exit():
        main(parse_args(sys.argv[1:], cls, description))
