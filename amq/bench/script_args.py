"""The command line every benchmark script shares: its docstring as help, Hydra overrides as arguments."""

from __future__ import annotations

import argparse


def script_parser(doc: str | None, overrides_help: str) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring, taking Hydra overrides (`key=value`) as positionals."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help=overrides_help)
    return ap
