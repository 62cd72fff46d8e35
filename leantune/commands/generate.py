"""`leantune generate` (not implemented yet)."""
from __future__ import annotations

import argparse

from ..errors import LeantuneError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    raise LeantuneError("this command is not implemented yet")
