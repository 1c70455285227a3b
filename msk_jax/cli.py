"""The command-line tools' top level: `run(main)` in place of absl's `app.run(main)`.

Whatever stops a tool ends in one line on stderr and a non-zero exit:

    error: <what is wrong, naming the flag, file or field>

- exit 2, before the tool's `main` runs (so nothing, a work directory included, is created): a
  command line that cannot be parsed (an unknown flag, a value of the wrong type, a missing
  required flag), a `--config` file that does not exist or cannot be read or loaded, an unknown
  variant (`configs/howto.py:demoo`), an override of a field the configuration does not have
  (`--config.optimiser.lr=1`: the closest field names are suggested);
- exit 1: what the run met, i.e. the package's own errors (data that cannot be used, a
  checkpoint that does not fit, ...) and every `OSError` (a missing or unreadable file, a
  read-only or full disk, no permission: its file and cause);
- exit 1, for any other exception (unexpected, possibly a bug): the same one line with the
  exception's type and where it was raised;
- exit 130 on Ctrl-C, where the tool does not handle it itself.

`--verbose` (or `MSK_JAX_TRACEBACK=1` in the environment) shows the traceback instead.

The `--config` file is checked before absl parses the flags, because ml_collections' config
flags fail inside the parser (a chain of tracebacks, or, for a missing file, only when the
configuration is first read: after the tool has started). The check loads the file once more
(`get_config` has no side effects in this package's configurations).
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import logging as std_logging
import os
import sys
import traceback
from typing import Callable, Sequence

TRACEBACK_ENV = "MSK_JAX_TRACEBACK"

# The package's error classes: what they say is meant for the user. Looked up by module among those
# already imported (an exception of a class whose module was never imported cannot occur), so
# that this module imports none of the heavy ones.
USER_ERRORS = {
    "msk_jax.errors": ("DataError",),
    "msk_jax.checkpoints": ("CheckpointError",),
    "msk_jax.convert": ("ConversionError",),
    "msk_jax.train": ("NonFiniteLossError",),
    "msk_jax.data.loader": ("InputPositionError",),
    "msk_jax.hosts": ("LayoutError",),
    "msk_jax.extract.extractor": ("InputError",),
    "msk_jax.search": ("SearchError",),
    "msk_jax.lease": ("LeaseError",),
}


class ConfigurationError(Exception):
    """A command line or `--config` that cannot be used (exit 2, before `main`)."""


def run(main: Callable[[list[str]], int | None], *, config_flag: str | None = None,
        default_config: str | None = None, define_flags: Callable[[], None] | None = None,
        errors: Sequence[type] = ()) -> None:
    """Runs absl's `app.run(main)` with the handling above.

    config_flag: the name of the tool's ml_collections config-file flag: its value is resolved
      (`configs.resolve_argv`: `configs/howto.py` from any directory) and checked with its
      overrides before the flags are parsed. default_config: the file that flag reads when the
      command line names none. define_flags: defines the tool's flags, under this handling (a
      config flag with a default reads its overrides when defined). errors: more exception
      classes whose message is meant for the user (exit 1)."""
    from absl import app, flags

    quiet_absent_tpu()
    verbose = wants_traceback(sys.argv)
    as_written = list(sys.argv)
    if config_flag:
        from msk_jax import configs

        sys.argv = configs.resolve_argv(sys.argv, config_flag)
    if "verbose" not in flags.FLAGS:
        flags.DEFINE_bool("verbose", False, f"Show the traceback of an error (also: {TRACEBACK_ENV}=1).",
                          module_name=sys.argv[0])  # listed by --helpshort with the tool's own flags

    def parse(argv):
        try:
            if config_flag:
                check_config(argv, config_flag, default_config, as_written)
            if define_flags is not None:
                define_flags()
            return flags.FLAGS(argv)
        except SystemExit:
            raise
        except BaseException as err:  # any failure to parse is the command line's
            if verbose:
                raise
            if isinstance(err, KeyboardInterrupt):
                _fail("interrupted", 130)
            _fail(_parse_message(err), 2)

    def guarded(argv):
        try:
            return main(argv)
        except SystemExit:
            raise
        except BaseException as err:
            if verbose:
                raise
            code, message = describe(err, tuple(errors))
            _fail(message, code)

    app.run(guarded, flags_parser=parse)


def wants_traceback(argv: Sequence[str]) -> bool:
    """Whether `--verbose` (absl's boolean spellings, the last one counting) or
    MSK_JAX_TRACEBACK is set; read from argv itself, since parsing the flags can fail."""
    wanted = os.environ.get(TRACEBACK_ENV, "").strip().lower() not in ("", "0", "false", "no")
    for arg in argv[1:]:
        if arg == "--":
            break
        if not arg.startswith("-"):
            continue
        name, _, value = arg.lstrip("-").partition("=")
        if name == "verbose":
            wanted = value.lower() not in ("0", "false", "f", "no", "n") if value else True
        elif name == "noverbose":
            wanted = False
    return wanted


def _fail(message: str, code: int) -> None:
    """Ends the process with `error: <message>` on stderr."""
    sys.stdout.flush()
    print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- the --config flag ----------------------------------------------------------------------------

def check_config(argv: Sequence[str], name: str, default: str | None,
                 as_written: Sequence[str] | None = None) -> None:
    """Raises ConfigurationError naming the problem if the `--<name>` file of `argv` (or
    `default`) cannot be read or loaded, or an override `--<name>.FIELD` names no field.
    `as_written`: argv before the --config paths were resolved, for the messages."""
    from absl import flags

    read = functools.partial(flags.FLAGS.read_flags_from_files, force_gnu=False)  # --flagfile, as ml_collections
    argv = read(list(argv))
    value, overrides = _config_args(argv, name)
    written = _config_args(read(list(as_written)), name)[0] if as_written is not None else value
    shown = f"--{name}={written}" if value is not None else f"--{name} (default {default})"
    value = default if value is None else value
    if value is None:
        return  # absl reports a required flag; a tool without a default reads no file
    file, _, variant = value.partition(":")
    if not os.path.isfile(file):
        what = "is a folder, not a configuration file" if os.path.isdir(file) else "no such file"
        raise ConfigurationError(f"{shown}: {what} '{file}'")
    try:
        with open(file, "rb"):
            pass
    except OSError as err:
        raise ConfigurationError(f"{shown}: cannot read '{file}': {err.strerror}") from err
    try:
        spec = importlib.util.spec_from_file_location(f"{name}_config_check", file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(variant) if ":" in value else module.get_config()
    except SyntaxError as err:
        raise ConfigurationError(f"{shown}: {err.filename}, line {err.lineno}: {err.msg}") from err
    except Exception as err:
        raise ConfigurationError(f"{shown}: {_message(err)}") from err
    for override in overrides:
        problem = missing_field(config, override)
        if problem:
            raise ConfigurationError(f"--{name}.{override}: {problem}")


def _config_args(argv: Sequence[str], name: str) -> tuple[str | None, list[str]]:
    """(the last value of --<name>, the fields of its overrides --<name>.FIELD) in argv."""
    value, overrides, take_next = None, [], False
    for arg in argv[1:]:
        if take_next:
            value, take_next = arg, False
            continue
        if arg == "--":
            break
        stripped = arg.lstrip("-")
        if not arg.startswith("-"):
            continue
        if stripped == name:
            take_next = True
        elif stripped.startswith(f"{name}="):
            value = stripped.split("=", 1)[1]
        elif stripped.startswith((f"{name}.", f"no{name}.")):
            overrides.append(stripped.split("=", 1)[0].split(".", 1)[1])
    return value, overrides


def missing_field(config, path: str) -> str | None:
    """None if `path` (a.b.c, as an override names it) is a field of `config`, else what is
    wrong, with the closest existing fields."""
    from ml_collections import ConfigDict

    node, parts = config, path.split(".")
    for i, part in enumerate(parts):
        key = part.split("[", 1)[0]  # a.b[0]: an element of a sequence field
        if not isinstance(node, (ConfigDict, dict)):
            return None  # within a field's value: ml_collections reports what it cannot set
        if key not in node:
            where = f"'{'.'.join(parts[:i])}'" if i else "the configuration"
            closest = _closest_fields(config, parts[:i], key, parts[i + 1:], list(node))
            hint = f"; closest: {', '.join(closest)}" if closest else f"; its fields: {', '.join(sorted(node))}"
            return f"{where} has no field '{key}'{hint}"
        node = node[key]
    return None


def _closest_fields(config, parents: list[str], key: str, rest: list[str], siblings: list[str]) -> list[str]:
    """The fields the user may have meant by `parents.key.rest`: a sibling named like `key`
    (with `rest` when that exists too, e.g. optimizer.lr for optimiser.lr), else a field of
    another section named like `key` (optimizer.lr for lrr)."""
    found = []
    for name in closest_names(key, siblings):
        with_rest = ".".join(parents + [name] + rest)
        found.append(with_rest if rest and missing_field(config, with_rest) is None else ".".join(parents + [name]))
    if found:
        return found
    leaves = {p: p.rsplit(".", 1)[-1] for p in field_paths(config)}
    names = set(closest_names(key, sorted(set(leaves.values())), cutoff=0.75))
    return [p for p, leaf in leaves.items() if leaf in names][:3]


def closest_names(name: str, candidates: Sequence[str], cutoff: float = 0.6, margin: float = 0.1) -> list[str]:
    """The candidates most like `name`: those within `margin` of the best similarity (difflib's
    ratio), if that is at least `cutoff`; at most three."""
    scored = sorted(((difflib.SequenceMatcher(None, name, c).ratio(), c) for c in candidates), reverse=True)
    if not scored or scored[0][0] < cutoff:
        return []
    return [c for ratio, c in scored[:3] if ratio >= scored[0][0] - margin]


def field_paths(config, prefix: str = "") -> list[str]:
    """Every field of `config` as a dotted path (sections included)."""
    from ml_collections import ConfigDict

    paths = []
    for key in config:
        path = f"{prefix}{key}"
        paths.append(path)
        if isinstance(config[key], (ConfigDict, dict)):
            paths += field_paths(config[key], path + ".")
    return paths


def _parse_message(err: BaseException) -> str:
    """What a failure to parse the command line says."""
    if isinstance(err, ConfigurationError):
        return str(err)
    from absl import flags

    if isinstance(err, flags.Error):  # absl's own message names the flag and its value
        return f"{_message(err)} (see --helpshort)"
    return _message(_root(err))


def _root(err: BaseException) -> BaseException:
    """The first exception of a chain (ml_collections wraps the original two or three times)."""
    seen = {id(err)}
    while (cause := err.__cause__ or err.__context__) is not None and id(cause) not in seen:
        seen.add(id(cause))
        err = cause
    return err


def _message(err: BaseException) -> str:
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return text or type(err).__name__


# --- errors while running ------------------------------------------------------------------------

def describe(err: BaseException, extra: tuple[type, ...] = ()) -> tuple[int, str]:
    """(exit code, one line) for an exception that stopped a tool's `main`."""
    from absl import app

    if isinstance(err, KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(err, app.UsageError):
        return 2, f"{_message(err)} (see --help)"
    if isinstance(err, OSError):
        return 1, os_message(err)
    if isinstance(err, extra + user_error_classes()):
        return 1, _message(err)
    frame = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
    where = f" at {_short(frame.filename)}:{frame.lineno}" if frame else ""
    return 1, (f"{type(err).__name__}: {_message(err)} (raised{where}; --verbose or {TRACEBACK_ENV}=1 shows "
               "the traceback)")


def user_error_classes() -> tuple[type, ...]:
    """The classes of USER_ERRORS whose modules are imported."""
    found = []
    for module_name, names in USER_ERRORS.items():
        module = sys.modules.get(module_name)
        found += [getattr(module, n) for n in names if module is not None and hasattr(module, n)]
    return tuple(found)


def os_message(err: OSError) -> str:
    """An OSError as `<file>: <cause>` (both files of a rename or link)."""
    cause = err.strerror or _message(err)
    if err.filename is None:
        return cause
    files = f"{err.filename}" + (f" -> {err.filename2}" if err.filename2 is not None else "")
    return f"{files}: {cause}"


def _short(filename: str) -> str:
    """A source file relative to the package's parent folder, when in it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.relpath(filename, root) if filename.startswith(root + os.sep) else filename


# --- quiet ------------------------------------------------------------------------------------------

class _AbsentTPUFilter(std_logging.Filter):
    """Drops JAX's note that it found no TPU library: JAX logs a backend that fails quietly at
    INFO, and absl's `app.run` shows INFO; on a host without libtpu that is every start. A
    backend that fails otherwise (present but broken) still shows."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (record.levelno <= std_logging.INFO and message.startswith("Unable to initialize backend 'tpu'")
                    and "libtpu" in message and "cannot open shared object file" in message)


def quiet_absent_tpu() -> None:
    logger = std_logging.getLogger("jax._src.xla_bridge")
    if not any(isinstance(f, _AbsentTPUFilter) for f in logger.filters):
        logger.addFilter(_AbsentTPUFilter())
