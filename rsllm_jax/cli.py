"""How the command-line tools report errors: one line for bad input, a traceback on demand.

An error caused by what the user gave (a file, a flag, a config value) prints as one line,
`DataError: <file>, row 3: ...`, on stderr, and the tool exits with status 1. Set
RSLLM_TRACEBACK=1 to see the full traceback instead (for debugging).
"""

import contextlib
import os
import re
import sys

from absl import flags

TRACEBACK_ENV = "RSLLM_TRACEBACK"
# What bad input raises: DataError, UnsafeCheckpointError and PromptTooLongError are
# ValueErrors, missing or unreadable files OSErrors, a diverging run a FloatingPointError.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _unknown_config_field(error, argv):
    """`--config.a.b=1: the config has no field 'b'` for the KeyError ml_collections raises while
    absl parses an override naming no field; None for other errors."""
    chain, cause = [], error
    while cause is not None:
        chain.append(cause)
        cause = cause.__context__
    keys = [e for e in chain if isinstance(e, KeyError)]
    if not keys:
        return None
    field = str(keys[-1].args[0])
    hint = re.search(r"Did you mean (\S+)", str(keys[0].args[0]))
    flag = next(
        (a for a in argv
         if a.startswith("--") and "." in a.split("=")[0] and field in a.split("=")[0].split(".")),
        "the command line")
    return (f"{flag}: the config has no field {field!r}" +
            (f" (did you mean {hint.group(1)}?)" if hint else ""))


@contextlib.contextmanager
def one_line_errors(config_flag=False, argv=None):
    """Reports USER_ERRORS as one line and exits 1; with `config_flag` (an ml_collections config
    flag), also an override naming no config field, met while absl parses the flags. Anything
    else, or everything with RSLLM_TRACEBACK=1, propagates."""
    try:
        yield
    except Exception as e:  # pylint: disable=broad-except
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        message = None
        if (config_flag and not flags.FLAGS.is_parsed()
                and isinstance(e, (KeyError, AttributeError))):
            message = _unknown_config_field(e, sys.argv if argv is None else argv)
        if message is None and isinstance(e, USER_ERRORS):
            message = f"{type(e).__name__}: {e}"
        if message is None:
            raise
        print(" ".join(message.split()), file=sys.stderr)  # One line, whatever it quotes.
        sys.exit(1)
