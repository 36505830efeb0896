"""The ``capray`` command, derived from the job configs in :mod:`capray.config`.

Every field of a subcommand's config dataclass is a flag (``batch_size`` → ``--batch-size``; the fields
of a nested dataclass take its name as prefix, ``--encoder.name``), with the field's docstring as help
and its default as default, so the command line cannot drift from the configs. ``--config run.yaml``
reads the same options from a file (keys are field names; flags typed on the command line win). Flags
renamed in 0.2 (``config.RENAMED``) still work, with a warning. ``jobs/<command>.py`` parse exactly
what ``capray <command>`` parses.

Exit codes (``run``): 0 done; 2 what the user must fix (bad usage or configuration, a location that
cannot be used, an unreadable input: a ``capray.errors.ConfigError``; one line on stderr, before heavy
work where it can be checked first); 1 anything transient or unexpected (one line on stderr;
``CAPRAY_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import errno
import functools
import inspect
import logging
import os
import sys
import textwrap
import traceback
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from capray import config as configs
from capray.errors import ConfigError

log = logging.getLogger("capray")

CONFIG_FLAG = "--config"
VERBOSE_FLAG = "--verbose"
_METAVAR = {int: "INT", float: "NUMBER", str: "TEXT"}


class Parser(argparse.ArgumentParser):
    """argparse with the exit-2-in-one-line contract for usage errors."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


@dataclasses.dataclass(frozen=True)
class Option:
    """One flag: where its value goes in the config (``path``), how it parses, its help."""

    flag: str
    path: tuple[str, ...]
    kind: type
    """``int``, ``float``, ``str``, ``bool`` or ``tuple`` (a repeatable string option)."""
    choices: tuple[str, ...] | None
    default: Any
    required: bool
    help: str

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    def convert(self, value: Any, where: str) -> Any:
        """A value from a config file (already parsed by YAML) → this option's type."""
        if self.kind is tuple:
            items = value if isinstance(value, (list, tuple)) else [value]
            if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
                raise ConfigError(f"{where}: {self.flag} takes a list of strings, got {value!r}")
            return [str(v) for v in items]
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {self.flag} takes true or false, got {value!r}")
            return value
        if isinstance(value, (dict, list, bool)) or value is None:
            raise ConfigError(f"{where}: {self.flag} takes one {self.kind.__name__}, got {value!r}")
        try:
            return self.kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {self.flag} takes one {self.kind.__name__}, got {value!r}") from None


def options(cls: type, path: tuple[str, ...] = (), prefix: str = "") -> Iterator[Option]:
    """The flags of a config dataclass, nested dataclasses included, in field order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            nested_prefix = prefix if f.metadata.get("flat") else f"{prefix}{f.name}."
            yield from options(hint, (*path, f.name), nested_prefix)
            continue
        kind, choices = _kind(hint, cls, f.name)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        yield Option(flag=f"--{prefix}{f.name.replace('_', '-')}", path=(*path, f.name), kind=kind,
                     choices=choices, default=default, required=required, help=docs.get(f.name, ""))


def _kind(hint: Any, cls: type, name: str) -> tuple[type, tuple[str, ...] | None]:
    if hint in (int, float, str, bool):
        return hint, None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return str, tuple(str(a) for a in args)
    if origin is tuple and args in ((str, ...),):
        return tuple, None
    raise TypeError(f"{cls.__name__}.{name}: no command-line form for {hint!r}")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each field of a dataclass (its help), whitespace folded."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.replace("``", "").split())
    return docs


class _Renamed(argparse.Action):
    """An old flag name: warns, then stores into the new option (``value``: what a valueless old flag meant)."""

    def __init__(self, option_strings, dest, *, command: str, new: Option, value: str | None, **kwargs):
        self.command, self.new, self.value = command, new, value
        nargs = 0 if value is not None or new.kind is bool else None
        super().__init__(option_strings, dest, nargs=nargs, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        use = self.new.flag if self.value is None else f"{self.new.flag} {self.value}"
        print(f"capray {self.command}: warning: {option_string} is deprecated and goes in 0.3; use {use}",
              file=sys.stderr)
        raw = self.value if self.value is not None else values
        if self.new.kind is tuple:
            setattr(namespace, self.dest, [*getattr(namespace, self.dest, []), raw])
        elif self.new.kind is bool:
            setattr(namespace, self.dest, True)
        else:
            try:
                value = self.new.kind(raw)
            except ValueError:
                parser.error(f"argument {option_string}: invalid {self.new.kind.__name__} value: {raw!r}")
            if self.new.choices and value not in self.new.choices:
                parser.error(f"argument {option_string}: {raw!r} is not one of {', '.join(self.new.choices)}")
            setattr(namespace, self.dest, value)


def add_options(p: argparse.ArgumentParser, command: str) -> None:
    """The flags of ``command``'s config on ``p``; nothing has an argparse default (see ``build``)."""
    by_flag = {}
    for option in options(configs.COMMANDS[command]):
        by_flag[option.flag] = option
        common = {"dest": option.dest, "default": argparse.SUPPRESS}
        help_text = option.help.replace("%", "%%")
        if option.required:
            help_text += " (required)"
        elif option.kind is tuple:
            help_text += f" (default: {','.join(option.default) or 'none'})"
        elif option.kind is not bool:
            help_text += f" (default: {option.default})"
        if option.kind is bool:
            p.add_argument(option.flag, action="store_true", help=help_text, **common)
            p.add_argument(f"--no-{option.flag[2:]}", action="store_false", help=argparse.SUPPRESS, **common)
        elif option.kind is tuple:
            p.add_argument(option.flag, action="append", metavar="TEXT", help=help_text + " (repeatable)", **common)
        else:
            p.add_argument(option.flag, type=option.kind, choices=option.choices, help=help_text,
                           metavar=None if option.choices else _METAVAR[option.kind], **common)
    for old, (new, *value) in configs.RENAMED.get(command, {}).items():
        p.add_argument(old, action=_Renamed, command=command, new=by_flag[new], value=value[0] if value else None,
                       dest=by_flag[new].dest, default=argparse.SUPPRESS)
    p.add_argument(VERBOSE_FLAG, action="store_true", default=argparse.SUPPRESS,
                   help="also show Ray's own output on the console: worker logs, Ray Data's progress (it always "
                        "goes to Ray's log files)")
    p.add_argument(CONFIG_FLAG, metavar="YAML", default=argparse.SUPPRESS,
                   help="a YAML file of these options (keys are the field names, e.g. batch_size: 64; nested "
                        "ones as encoder: {name: resnet18}); flags on the command line override it")


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of one subcommand (for ``jobs/*.py``), or of the whole ``capray`` command."""
    if command is not None:
        p = Parser(prog=f"capray {command}", description=_summary(command))
        add_options(p, command)
        return p
    p = Parser(prog="capray", description="Distributed image captioning on Ray.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in configs.COMMANDS:
        add_options(sub.add_parser(name, help=_summary(name), description=_summary(name)), name)
    return p


def _summary(command: str) -> str:
    first = (configs.COMMANDS[command].__doc__ or "").strip().splitlines()[0]
    return first.split(": ", 1)[-1].replace("``", "").rstrip(".")


def build(command: str, args: argparse.Namespace) -> Any:
    """The config of ``command`` from parsed flags, over ``--config``'s file, over the defaults."""
    opts = list(options(configs.COMMANDS[command]))
    values = dict(read_config_file(command, args.config, opts)) if getattr(args, "config", None) else {}
    values.update((k, v) for k, v in vars(args).items() if k not in ("command", "config", "verbose"))
    missing = [o.flag for o in opts if o.required and o.dest not in values]
    if missing:
        raise ConfigError(f"the following options are required: {', '.join(missing)} "
                          f"(as flags or in {CONFIG_FLAG}); see capray {command} --help")
    return _construct(configs.COMMANDS[command], (), values)


def _construct(cls: type, path: tuple[str, ...], values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            kwargs[f.name] = _construct(hints[f.name], (*path, f.name), values)
            continue
        dest = "__".join((*path, f.name))
        if dest in values:
            kwargs[f.name] = tuple(values[dest]) if isinstance(values[dest], list) else values[dest]
    return cls(**kwargs)


def read_config_file(command: str, uri: str, opts: Sequence[Option]) -> dict[str, Any]:
    """A YAML mapping of options → ``{dest: value}``; unknown keys and wrong types are errors."""
    import yaml

    from capray import storage

    uri = storage.normalize(uri)
    try:
        data = yaml.safe_load(storage.read_text(uri))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{CONFIG_FLAG} {uri}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{CONFIG_FLAG} {uri}: expected a mapping of option names to values")
    by_key = {o.flag[2:].replace("-", "_"): o for o in opts}
    values = {}
    for key, value in _flatten(data):
        option = by_key.get(key.replace("-", "_"))
        if option is None:
            raise ConfigError(f"{CONFIG_FLAG} {uri}: capray {command} has no option {key!r}")
        values[option.dest] = option.convert(value, f"{CONFIG_FLAG} {uri}")
    return values


def _flatten(data: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def run(command: str, args: argparse.Namespace) -> int:
    """Run a parsed subcommand with the exit-code contract; used by ``main`` and the job files.

    2 for what the user must fix (``user_error``), in one line; 1 for anything else (transient or
    unexpected), in one line; 130 when interrupted.
    """
    if getattr(args, "verbose", False):
        from capray.console import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    setup_logging()
    try:
        config = build(command, args)
    except ValueError as exc:  # building the config checks only what the user typed: always theirs to fix
        return _usage_error(command, exc)
    try:
        from capray.locations import check_locations

        check_locations(command, config)  # before any Ray or heavy work
        _dispatch(command, config)
    except KeyboardInterrupt:
        print(f"capray {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        cause = user_error(exc)
        if cause is not None:
            return _usage_error(command, cause)
        return _unexpected(command, exc)
    return 0


USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                         errno.EEXIST, errno.ENOSPC, errno.EDQUOT})
"""An ``OSError`` with one of these (permission denied, read-only, not found, a file where a folder should
be, no space left) is the user's to fix: running the same command again would fail the same way."""


def user_error(exc: BaseException) -> BaseException | None:
    """The error the user must fix behind ``exc``, or None when it is transient or unexpected (exit 1).

    Follows what wraps an error on its way to the driver: Ray's task errors (``cause``), Ray Train's
    worker and controller failures, and ``raise ... from``. A ``capray.errors.ConfigError`` is the user's;
    an ``OSError`` is theirs when its errno says so (``USER_ERRNOS``), unless capray's storage layer
    classed it transient. Any other ``ValueError`` (pyarrow's ``ArrowInvalid`` among them) is not.
    """
    from capray.storage import TransientStorageError

    pending, seen = [exc], set()
    while pending:
        error = pending.pop(0)
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if _is_ray_error(error) and isinstance(getattr(error, "cause", None), BaseException):
            pending.insert(0, error.cause)  # Ray's wrapper subclasses its cause's class; the cause says it in one line
            continue
        if isinstance(error, TransientStorageError):
            return None
        if isinstance(error, ConfigError):
            return error
        if isinstance(error, OSError) and not isinstance(error, (ConnectionError, TimeoutError)) \
                and error.errno in USER_ERRNOS:
            return error
        pending += [getattr(error, "cause", None), error.__cause__, getattr(error, "controller_failure", None),
                    *(getattr(error, "worker_failures", None) or {}).values()]
    return None


def _is_ray_error(exc: BaseException) -> bool:
    ray_exceptions = sys.modules.get("ray.exceptions")
    return ray_exceptions is not None and isinstance(exc, ray_exceptions.RayError)


def _usage_error(command: str, exc: BaseException) -> int:
    if os.environ.get("CAPRAY_DEBUG"):
        traceback.print_exception(exc)
    print(f"capray {command}: error: {_one_line(exc)}", file=sys.stderr)
    return 2


def _unexpected(command: str, exc: BaseException) -> int:
    if os.environ.get("CAPRAY_DEBUG"):
        traceback.print_exc()
    print(f"capray {command}: failed: {type(exc).__name__}: {_one_line(exc)} "
          "(set CAPRAY_DEBUG=1 for the traceback)", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return run(args.command, args)


def job_main(command: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of ``jobs/<command>.py``: same flags as ``capray <command>``."""
    return run(command, parser(command).parse_args(argv))


def setup_logging() -> None:
    level = os.environ.get("CAPRAY_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # botocore: "Found credentials in environment variables" per client; matplotlib: its font cache, once.
    for chatty in ("botocore", "boto3", "urllib3", "matplotlib"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))


def _dispatch(command: str, config: Any) -> None:
    if command == "synth":
        from capray.synth import generate

        written = generate(config.out, config.world, format=config.format, samples_per_shard=config.samples_per_shard)
        what = "manifest" if config.format == "files" else f"{config.format} shards"
        print(f"wrote {config.world.num_images} images; {what}: {written}")
    elif command == "prepare":
        from capray.features import prepare, print_summary

        print_summary(prepare(config))
    elif command == "train":
        from capray.training import print_summary, train

        print_summary(train(config))
    elif command == "caption":
        from capray.captioning import caption, print_summary

        summary = caption(config)
        print_summary(summary)
        if summary.retryable:
            raise IncompleteRun(f"{summary.retryable} image(s) could not be read for a transient reason "
                                "(throttling, timeouts); run the same command again to caption them")
    elif command == "evaluate":
        from capray.evaluation import evaluate, print_metrics

        print_metrics(evaluate(config))
    elif command == "attend":
        from capray.evaluation import attend

        words = attend(config.checkpoint, config.image, config.out, beam_size=config.beam_size,
                       max_length=config.max_length)
        print(f"{' '.join(words)}\nattention plot: {config.out}")
    elif command == "gallery":
        from capray.gallery import make_gallery, print_summary

        print_summary(make_gallery(config))
    elif command == "demo":
        from capray.demo import run_demo

        run_demo(config.out, num_images=config.num_images, epochs=config.epochs)


class IncompleteRun(Exception):
    """A run that did what it could but left work that running it again will do (exit 1)."""


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] if text else type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
