"""The command line of every script: one @dataclass Config per script, overridden by --key=value (nanoGPT's syntax,
typed: unknown keys and wrong types are errors), and --help, which lists each option with the comment beside its field.
"""
import inspect
import io
import sys
import textwrap
import tokenize
from dataclasses import asdict, fields, is_dataclass


def parse_args(cls, argv):
    """--key=value overrides of the dataclass `cls` -> an instance. --help (or -h) prints the options and exits."""
    cfg, types = cls(), {f.name: f.type for f in fields(cls)}
    if "--help" in argv or "-h" in argv:
        print(help_text(cls, sys.modules["__main__"].__doc__))
        sys.exit(0)
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"expected --key=value, got {arg!r}")
        key, has_value, value = arg[2:].partition("=")
        if key not in types:
            raise ValueError(f"unknown option --{key} (options: {', '.join('--' + k for k in types)})")
        kind = types[key]
        if kind is list:
            getattr(cfg, key).append(value)
            continue
        if not has_value and kind is not bool:
            raise ValueError(f"--{key} needs a value: --{key}=...")
        try:
            if kind is bool:
                if value.lower() not in ("", "1", "0", "true", "false"):
                    raise ValueError
                parsed = value.lower() in ("", "1", "true")
            else:
                parsed = kind(value)
        except ValueError:
            raise ValueError(f"--{key}={value!r} is not a valid {kind.__name__}") from None
        setattr(cfg, key, parsed)
    return cfg


def field_comments(cls):
    """({field: the comment beside it in the dataclass source}, {field: the section comment above it}), through the
    dataclass's bases: a base's first, a subclass's own over them (a field it redeclares without a comment keeps the
    base's). A comment line indented past the fields continues the comment of the field above; one at the fields'
    indent heads a section."""
    comments, sections = {}, {}
    for klass in reversed(cls.__mro__):
        if is_dataclass(klass):
            own_comments, own_sections = own_field_comments(klass)
            comments.update(own_comments)
            sections.update(own_sections)
    return comments, sections


def own_field_comments(cls):
    """field_comments of the fields written in cls's own body. Read with the tokenizer, so a '#' inside a string is no
    comment."""
    comments, sections, current, heading, seen = {}, {}, None, None, set()
    source = textwrap.dedent(inspect.getsource(cls))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        row, col = tok.start
        if tok.type == tokenize.NAME and col == 4 and row not in seen:  # a field line at the class body's indent
            current, seen = tok.string, seen | {row}
            if heading:
                sections[current], heading = heading, None
        elif tok.type == tokenize.COMMENT and col == 4:
            heading = tok.string.lstrip("# ")
        elif tok.type == tokenize.COMMENT and current is not None:
            comments[current] = (comments.get(current, "") + " " + tok.string.lstrip("# ")).strip()
    return comments, sections


def help_text(cls, doc=None):
    """The script's docstring, then one line per option: --name (type, default value): the comment beside it."""
    (comments, sections), defaults = field_comments(cls), cls()
    lines = [doc.strip(), ""] if doc else []
    lines.append("options (--key=value; a bool also as --key alone):")
    for f in fields(cls):
        if f.name in sections:
            lines.append(f"  {sections[f.name]}:")
        default = getattr(defaults, f.name)
        kind, shown = ("repeatable", "none") if f.type is list else (f.type.__name__, repr(default))
        lines.append(f"  --{f.name} ({kind}, default {shown})" + (f": {comments[f.name]}" if f.name in comments else ""))
    return "\n".join(lines)


def print_config(cfg):
    print("config: " + " ".join(f"{k}={v}" for k, v in asdict(cfg).items()))
