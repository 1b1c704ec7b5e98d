"""`secret-broker completions bash|zsh|fish`: completion scripts generated from the parser.

Commands, options and choices are read from `build_parser()`, so a new command or flag
completes without an edit here. Refs come from `secret-broker list --refs`, which reads
only metadata.db: completion never touches a value and works while the store is locked.

Each script holds two generated tables (per command path: its subcommands, options and
value-taking options; per option, and per operand, what follows) and one small hand-written
walker in the shell's own syntax. bash and zsh share the walker and the tables.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

REF_DESTS = ("ref", "secret")  # arguments that name a secret ref
FILE_METAVARS = ("FILE", "TEMPLATE")
_SAFE = re.compile(r"[A-Za-z0-9_.@:,=+/ -]*")  # nothing a shell would interpret inside '…'


@dataclass(frozen=True)
class Arg:
    """What an argument takes: "words" (from a fixed list), "refs", "files" or "none"."""

    kind: str
    words: tuple[str, ...] = ()


@dataclass(frozen=True)
class Node:
    """One command path ("" for the program, "grants check" for a nested command)."""

    path: str
    commands: tuple[str, ...]
    options: tuple[str, ...]
    values: tuple[tuple[str, Arg], ...]  # option string -> what follows it; "" -> operand


def _arg(action: argparse.Action) -> Arg:
    if action.choices is not None:
        return Arg("words", tuple(str(c) for c in action.choices))
    if action.dest in REF_DESTS:
        return Arg("refs")
    if action.metavar in FILE_METAVARS or action.dest == "file":
        return Arg("files")
    return Arg("none")


def command_tree(parser: argparse.ArgumentParser, path: str = "") -> list[Node]:
    """Every command path of the parser, depth first; hidden options left out."""
    commands: dict[str, argparse.ArgumentParser] = {}
    options: list[str] = []
    values: list[tuple[str, Arg]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
        elif action.help == argparse.SUPPRESS:
            continue
        elif action.option_strings:
            options += action.option_strings
            if action.nargs != 0:
                values += [(option, _arg(action)) for option in action.option_strings]
        elif "" not in dict(values):
            values.append(("", _arg(action)))  # the first positional argument
    nodes = [Node(path, tuple(commands), tuple(options), tuple(values))]
    for name, sub in commands.items():
        nodes += command_tree(sub, f"{path} {name}".lstrip())
    return nodes


def _q(text: str) -> str:
    """Single-quoted for sh, zsh and fish alike (the text is checked to need no escape)."""
    if not _SAFE.fullmatch(text):
        raise ValueError(f"cannot quote {text!r} for a completion script")
    return f"'{text}'"


def _words(items: Sequence[str]) -> str:
    return _q(" ".join(items))


def _arg_lines(arg: Arg) -> tuple[str, ...]:
    """The lines a walker prints for an argument: its kind, then (for words) the words."""
    return (arg.kind, " ".join(arg.words)) if arg.kind == "words" else (arg.kind,)


def _takes(node: Node) -> str:
    return _words([option for option, _ in node.values if option])


def _tables(nodes: Sequence[Node], template: str, branch: Callable[[str, str], str],
            node_body: Callable[[Node], str]) -> str:
    """Fill a script's two tables; `branch(pattern, body)` is one case in its syntax."""
    node_cases = "\n".join(branch(n.path, node_body(n)) for n in nodes)
    value_cases = "\n".join(
        branch(f"{n.path} {option}", "printf '%s\\n' " + " ".join(map(_q, _arg_lines(arg))))
        for n in nodes for option, arg in n.values if arg.kind != "none")
    return template.replace("@NODES@", node_cases).replace("@VALUES@", value_cases)


def _sh_tables(nodes: Sequence[Node]) -> str:
    return _tables(
        nodes, _SH_TABLES, lambda pattern, body: f"        {_q(pattern)}) {body} ;;",
        lambda n: f"subs={_words(n.commands)}; opts={_words(n.options)}; takes={_takes(n)}")


def _fish_tables(nodes: Sequence[Node]) -> str:
    return _tables(
        nodes, _FISH_TABLES,
        lambda pattern, body: f"        case {_q(pattern)}\n            {body}",
        lambda n: f"printf '%s\\n' {_words(n.commands)} {_words(n.options)} {_takes(n)}")


_RENDER: dict[str, Callable[[Sequence[Node]], str]] = {
    "bash": lambda nodes: _BASH_HEAD + _sh_tables(nodes) + _SH_WALKER + _BASH_TAIL,
    "zsh": lambda nodes: _ZSH_HEAD + _sh_tables(nodes) + _SH_WALKER + _ZSH_TAIL,
    "fish": lambda nodes: _FISH_HEAD + _fish_tables(nodes) + _FISH_TAIL,
}
SHELLS = tuple(_RENDER)


def render(shell: str, parser: argparse.ArgumentParser) -> str:
    return _RENDER[shell](command_tree(parser))


# --- the scripts ------------------------------------------------------------------------------
# Words are split on whitespace only (COMP_LINE in bash, $words in zsh, commandline in fish),
# so "@" in bash's COMP_WORDBREAKS does not cut "@ref" in two.

_BASH_HEAD = """\
# bash completion for secret-broker (generated by `secret-broker completions bash`).
# Load it: source <(secret-broker completions bash)
"""

_ZSH_HEAD = """\
#compdef secret-broker
# zsh completion for secret-broker (generated by `secret-broker completions zsh`).
# Load it after compinit: source <(secret-broker completions zsh)
"""

_SH_TABLES = """
__secret_broker_node() {
    # Command path $1: its subcommands, options and the options that take a value.
    case "$1" in
@NODES@
        *) subs=''; opts=''; takes='' ;;
    esac
}

__secret_broker_value() {
    # What follows option $2 of command path $1 (with $2 empty: its operand): a kind
    # line ("words", "refs", "files"), then for "words" the words.
    case "$1 $2" in
@VALUES@
        *) echo none ;;
    esac
}
"""

_SH_WALKER = """
__secret_broker_candidates() {
    # $1: the word being completed; then the words before it, without the program name.
    # Prints what to offer: "words" and a line of words, or "refs", "files" or "none".
    local cur="$1" node="" prev="" w subs opts takes
    shift
    for w in "$@"; do
        __secret_broker_node "$node"
        case " $subs " in *" $w "*) node="${node:+$node }$w" ;; esac
        prev="$w"
    done
    __secret_broker_node "$node"
    if [ -n "$prev" ] && case " $takes " in *" $prev "*) true ;; *) false ;; esac; then
        __secret_broker_value "$node" "$prev"
    elif case "$cur" in -*) true ;; *) false ;; esac; then
        printf '%s\\n' words "$opts"
    elif [ -n "$subs" ]; then
        printf '%s\\n' words "$subs"
    else
        __secret_broker_value "$node" ""
    fi
}
"""

_BASH_TAIL = """
_secret_broker() {
    local line="${COMP_LINE:0:COMP_POINT}" cur="" kind="" offer=""
    local -a words
    read -ra words <<< "$line"
    if [[ -n $line && $line != *[[:space:]] ]]; then
        cur="${words[${#words[@]}-1]}"
        unset "words[${#words[@]}-1]"
    fi
    { read -r kind; read -r offer; } < <(__secret_broker_candidates "$cur" "${words[@]:1}")
    COMPREPLY=()
    case "$kind" in
        words) mapfile -t COMPREPLY < <(compgen -W "$offer" -- "$cur") ;;
        files) mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
        refs)
            mapfile -t COMPREPLY < <(compgen -P @ -W \\
                "$("${words[0]}" list --refs 2>/dev/null)" -- "${cur#@}")
            # "@" ends a word for readline: it replaces only what follows the "@".
            if [[ $cur == @* && $COMP_WORDBREAKS == *@* ]]; then
                COMPREPLY=("${COMPREPLY[@]#@}")
            fi ;;
    esac
}
complete -F _secret_broker secret-broker
"""

_ZSH_TAIL = """
_secret_broker() {
    local -a out refs
    out=("${(@f)$(__secret_broker_candidates "${words[CURRENT]}" "${(@)words[2,CURRENT-1]}")}")
    case "$out[1]" in
        words) compadd -- ${=out[2]} ;;
        files) _files ;;
        refs)
            refs=(${(f)"$("$words[1]" list --refs 2>/dev/null)"})
            compadd -- ${refs/#/@} ;;
    esac
}

if [[ $zsh_eval_context[-1] == loadautofunc ]]; then
    _secret_broker "$@"
else
    compdef _secret_broker secret-broker
fi
"""

_FISH_HEAD = """\
# fish completion for secret-broker (generated by `secret-broker completions fish`).
# Load it: secret-broker completions fish | source
"""

_FISH_TABLES = """
function __secret_broker_node
    # Command path $argv[1]: subcommands, options, the options that take a value.
    switch "$argv[1]"
@NODES@
        case '*'
            printf '%s\\n' '' '' ''
    end
end

function __secret_broker_value
    # What follows option $argv[2] of command path $argv[1] (empty: its operand).
    switch "$argv[1] $argv[2]"
@VALUES@
        case '*'
            echo none
    end
end
"""

_FISH_TAIL = """
function __secret_broker_complete
    set -l tokens (commandline -opc)
    set -l cur (commandline -ct)
    set -l node ''
    set -l prev ''
    for w in $tokens[2..-1]
        set -l spec (__secret_broker_node "$node")
        if contains -- $w (string split ' ' -- $spec[1])
            set node (string trim -- "$node $w")
        end
        set prev $w
    end
    set -l spec (__secret_broker_node "$node")
    set -l what none
    if test -n "$prev"; and contains -- $prev (string split ' ' -- $spec[3])
        set what (__secret_broker_value "$node" "$prev")
    else if string match -q -- '-*' "$cur"
        set what words $spec[2]
    else if test -n "$spec[1]"
        set what words $spec[1]
    else
        set what (__secret_broker_value "$node" "")
    end
    switch "$what[1]"
        case words
            string split ' ' -- $what[2]
        case files
            __fish_complete_path "$cur"
        case refs
            $tokens[1] list --refs 2>/dev/null | string replace -r '^' '@'
    end
end

complete -c secret-broker -f -a '(__secret_broker_complete)'
"""
