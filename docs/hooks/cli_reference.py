"""mkdocs hook: the CLI reference page, written from the command lines' own parsers at build time.

Each ``<!-- cli: NAME -->`` line of ``cli.md`` becomes the ``--help`` text of that command: its usage and options
as a code block, its description as text. The help comes from calling the command module's ``main(["--help"])``
with stdout captured, so the page lists exactly the flags the code accepts. ``data.py`` also gets one section per
subcommand. A command module that cannot be imported, or a ``main`` that does not stop at ``--help``, fails the
build with a message naming it.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import sys
from dataclasses import dataclass

from mkdocs.exceptions import PluginError

PAGE = "cli.md"
WIDTH = 88  # argparse wraps usage and option help at COLUMNS - 2
MARKER = re.compile(r"^<!-- cli: (?P<name>[\w-]+) -->$", re.MULTILINE)
SECTION = re.compile(r"^(options|optional arguments|positional arguments):$", re.MULTILINE)
# Sphinx roles in the modules' docstrings (:class:`~pkg.Name`), shown as plain code spans.
ROLE = re.compile(r":(?:class|func|meth|mod|attr|obj|data|exc):`(?P<tilde>~?)(?P<target>[^`]+)`")


@dataclass(frozen=True)
class Command:
    script: str  # what users type: python examples/e2enet/<script>, or python -m e2enet.<stem>
    subcommands: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        """The script as a module of the installed package; it re-exports the command's ``main(argv)``."""
        return "e2enet." + self.script.removesuffix(".py")


COMMANDS = {
    "train": Command("train.py"),
    "predict": Command("predict.py"),
    "evaluate": Command("evaluate.py"),
    "data": Command("data.py", ("verify", "convert-msd", "plan", "sample")),
    "prepare_mni": Command("prepare_mni.py"),
    "export_onnx": Command("export_onnx.py"),
    "accounting": Command("accounting.py"),
    "compare": Command("compare.py"),
    "demo": Command("demo.py"),
}


def command_main(command: Command):
    """The command's ``main``, or a build error naming the module that failed to import."""
    try:
        module = importlib.import_module(command.module)
    except Exception as error:  # any import failure: say which command, and what to do about it
        missing = error.name if isinstance(error, ModuleNotFoundError) else None
        fix = (
            'install the project with its examples extra where mkdocs runs: pip install -e ".[examples,docs]"'
            if missing and missing.split(".")[0] not in ("sparsefuse", "e2enet")
            else "fix the import error"
        )
        raise PluginError(
            f"CLI reference: cannot import {command.module} for the {command.script} section "
            f"({type(error).__name__}: {error}); the docs build imports every command: {fix}"
        ) from error
    if not callable(getattr(module, "main", None)):
        raise PluginError(f"CLI reference: {command.module} has no main(argv) to ask for --help")
    return module.main


def help_text(command: Command, argv: list[str]) -> str:
    """What ``python examples/e2enet/<script> <argv> --help`` prints, wrapped at WIDTH columns."""
    main = command_main(command)
    saved_argv0, saved_columns = sys.argv[0], os.environ.get("COLUMNS")
    sys.argv[0] = command.script  # argparse names the program after argv[0]
    os.environ["COLUMNS"] = str(WIDTH)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
            main([*argv, "--help"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise PluginError(
                f"CLI reference: {command.module}.main({[*argv, '--help']}) exited with {stop.code!r}: "
                f"{err.getvalue().strip()}"
            ) from None
    else:
        raise PluginError(f"CLI reference: {command.module}.main({[*argv, '--help']}) returned without printing help")
    finally:
        sys.argv[0] = saved_argv0
        if saved_columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved_columns
    text = out.getvalue().strip("\n")
    if not text.startswith("usage:"):
        raise PluginError(f"CLI reference: {command.module} --help printed no usage line:\n{text[:500]}")
    return text


def plain_role(match: re.Match) -> str:
    target = match["target"]
    return f"`{target.rsplit('.', 1)[-1] if match['tilde'] else target}`"


def render(text: str) -> str:
    """Usage and options as code, the description between them as Markdown."""
    usage, _, rest = text.partition("\n\n")
    found = SECTION.search(rest)
    description, options = (rest[: found.start()], rest[found.start() :]) if found else (rest, "")
    parts = [f"```text\n{usage}\n```"]
    if description.strip():
        parts.append(ROLE.sub(plain_role, description.strip("\n")))
    if options.strip():
        parts.append(f"```text\n{options.rstrip()}\n```")
    return "\n\n".join(parts)


def section(name: str) -> str:
    if name not in COMMANDS:
        raise PluginError(f"CLI reference: {PAGE} names an unknown command {name!r}; known: {sorted(COMMANDS)}")
    command = COMMANDS[name]
    where = command_main(command).__module__
    lines = [
        f"`python examples/e2enet/{command.script}`, or `python -m {command.module}`; implemented in `{where}`.",
        render(help_text(command, [])),
    ]
    for sub in command.subcommands:
        lines.append(f"### {command.script} {sub}\n\n`python examples/e2enet/{command.script} {sub} ...`")
        lines.append(render(help_text(command, [sub])))
    return "\n\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    named = MARKER.findall(markdown)
    missing = sorted(set(COMMANDS) - set(named))
    if missing:
        raise PluginError(f"CLI reference: {PAGE} has no <!-- cli: NAME --> line for {missing}")
    return MARKER.sub(lambda match: section(match["name"]), markdown)
