"""`exec` environments as templates: `--env VAR=@ref` flags and `--env-file` lines.

Pure. Every variable becomes a template (`VAR=@ref` is `{{ @ref }}`, a plain value has no
reference), so flags, files and profiles resolve and render through one path. Errors name
the line, never its text: a line may hold a value pasted by mistake.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from broker.core.errors import UsageError
from broker.core.refs import parse_ref
from broker.service.template import TemplateError, find_refs, ref_template

ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Variables that decide which program runs, what it loads or what a shell runs first. exec
# never sets them, from a flag, an env file or a profile: a child pointed at other code
# escapes its grants, and a loader echoes a value it cannot load on stderr. The launcher's
# own environment passes through unchanged.
LOADER_VARS = frozenset({
    "PATH", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND",
    "PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONBREAKPOINT",
    "NODE_OPTIONS", "NODE_PATH", "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB",
    "RUBYOPT", "RUBYLIB", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS",
    "CLASSPATH", "GCONV_PATH", "GLIBC_TUNABLES", "LOCPATH",
})
LOADER_PREFIXES = ("LD_", "DYLD_")
LOADER_REASON = "it decides which program runs or what it loads"
_EXPORT = re.compile(r"^export\s+")  # dotenv files written for a shell may carry it
_QUOTES = ('"', "'")


def is_loader_var(name: str) -> bool:
    """Whether exec refuses to set `name` (see LOADER_VARS)."""
    return name in LOADER_VARS or name.startswith(LOADER_PREFIXES)


def parse_env_flag(item: str) -> tuple[str, str]:
    """`--env VAR=@ref` -> (VAR, template)."""
    name, sep, ref = item.partition("=")
    if not sep or not ENV_NAME_RE.fullmatch(name) or not ref.startswith("@"):
        raise UsageError(f"--env {item!r}: write it as VAR=@ref")
    if is_loader_var(name):
        raise UsageError(f"--env {name}: {name} cannot be set by exec ({LOADER_REASON})")
    return name, ref_template(parse_ref(ref))


def parse_env_file(text: str, source: str) -> dict[str, str]:
    """`VAR=@ref`, `VAR=${{ secrets.NAME }}` and `VAR=value` lines -> {VAR: template}.

    Blank lines and `#` comment lines are skipped; `export ` before a line is allowed; one
    pair of quotes around a value is removed. Anything else is an error naming the line.
    """
    templates: dict[str, str] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = _EXPORT.sub("", line, count=1).partition("=")
        where = f"{source}, line {number}"
        if not sep:
            raise UsageError(f"{where}: not VAR=value (there is no '=')")
        if not ENV_NAME_RE.fullmatch(name):
            raise UsageError(f"{where}: the name before '=' must be letters, digits and _, "
                             "not starting with a digit, with no spaces around '='")
        if is_loader_var(name):
            raise UsageError(f"{where}: {name} cannot be set by exec ({LOADER_REASON})")
        if name in first_seen:
            raise UsageError(f"{where}: {name} is already set on line {first_seen[name]}")
        first_seen[name] = number
        templates[name] = _value_template(value, where)
    return templates


def _value_template(value: str, where: str) -> str:
    if len(value) >= 2 and value[0] in _QUOTES and value[-1] == value[0]:
        value = value[1:-1]
    if value.startswith("@"):
        try:
            return ref_template(parse_ref(value))
        except UsageError:
            raise UsageError(f"{where}: a value starting with '@' must be a secret ref, "
                             "1-128 of A-Z a-z 0-9 _ . -") from None
    try:
        find_refs(value)
    except TemplateError as exc:
        raise UsageError(f"{where}: {exc.reason}") from None
    return value


def env_uses(templates: Mapping[str, str]) -> dict[str, str]:
    """ref -> the variables it fills (comma-joined), so the audit says where a value went."""
    uses: dict[str, list[str]] = {}
    for name, template in templates.items():
        for ref in find_refs(template):
            uses.setdefault(ref, []).append(name)
    return {ref: ",".join(names) for ref, names in uses.items()}
