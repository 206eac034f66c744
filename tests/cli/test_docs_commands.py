"""docs/operations.md stays honest: every `kms ...` command in it parses with the real CLI
parser (argparse only, nothing runs), and every relative link in it resolves to an existing
file and, for a Markdown file with an anchor, to one of its headings.

Full command lines (in fenced code blocks, and inline code that names a whole command) must
parse completely. An inline mention of a verb alone (`kms tpk retire`) must name existing
commands and options; only its missing required arguments are forgiven.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from kms.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "operations.md"

FENCE = re.compile(r"^\s*```")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")
KMS_PROGRAMS = {"kms", "/opt/kms/bin/kms", ".venv/bin/kms"}


def split_fences(text: str) -> tuple[list[str], str]:
    """(lines inside fenced code blocks, backslash continuations joined; the text outside)."""
    inside: list[str] = []
    outside: list[str] = []
    in_fence = False
    pending = ""
    for raw in text.splitlines():
        if FENCE.match(raw):
            in_fence = not in_fence
            continue
        if not in_fence:
            outside.append(raw)
            continue
        line = f"{pending} {raw.strip()}" if pending else raw.rstrip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        inside.append(line)
    return inside, "\n".join(outside)


SHELL_OPERATORS = {"|", "||", "&&", ";", "&"}


def kms_argvs(command: str) -> list[list[str]]:
    """The arguments after the `kms` program of each command of a shell line (split at
    pipes, `&&` and `;`) that runs `kms`: directly, through sudo, or through the container's
    entrypoint."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars="|&;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:
        return []
    found: list[list[str]] = []
    segment: list[str] = []
    for word in [*words, ";"]:
        if word not in SHELL_OPERATORS:
            segment.append(word)
            continue
        argv = _kms_args(segment)
        if argv is not None:
            found.append(argv)
        segment = []
    return found


def _kms_args(words: list[str]) -> list[str] | None:
    while words:
        if words[0] in KMS_PROGRAMS:
            return words[1:]
        if words[:2] == ["sudo", "-u"] and len(words) > 3:
            words = words[3:]
        elif words[:3] == ["docker", "exec", "kms"] and words[3:4] == ["kms-entrypoint"]:
            return words[4:]
        else:
            return None
    return None


def parse_error(argv: list[str]) -> str | None:
    """argparse's complaint about ``kms argv``, or None when it parses."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv)
    except SystemExit as exc:
        return err.getvalue().strip().splitlines()[-1] if exc.code else None
    return None


def verb_of(argv: list[str]) -> tuple[str, ...]:
    """The command words of ``kms argv`` (``--home DIR`` skipped), e.g. ("tpk", "rotate")."""
    if argv[:1] == ["--home"]:
        argv = argv[2:]
    words: list[str] = []
    for word in argv[:2]:
        if word.startswith("-"):
            break
        words.append(word)
    return tuple(words)


def commands(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """(full command lines, inline mentions) of `kms` in a Markdown text."""
    fenced, outside = split_fences(text)
    full = [argv for line in fenced for argv in kms_argvs(line)]
    mentions = [argv for span in re.findall(r"`([^`]+)`", outside)
                for argv in kms_argvs(" ".join(span.split()))]
    return full, mentions


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    _, outside = split_fences(path.read_text(encoding="utf-8"))
    return {slug(m.group(1)) for line in outside.splitlines() if (m := HEADING.match(line))}


def test_every_full_command_line_parses() -> None:
    full, _ = commands(DOC.read_text(encoding="utf-8"))
    failures = [(shlex.join(argv), err) for argv in full if (err := parse_error(argv))]
    assert failures == []
    # The runbook is made of commands: an extractor that finds none must fail.
    assert len(full) >= 5 and len(full) + len(commands(DOC.read_text())[1]) >= 60


def test_every_inline_command_names_existing_commands_and_options() -> None:
    full, mentions = commands(DOC.read_text(encoding="utf-8"))
    failures = []
    for argv in mentions:
        err = parse_error(argv)
        if err is not None and "the following arguments are required" not in err:
            failures.append((shlex.join(argv), err))
    assert failures == []
    documented = {verb_of(argv) for argv in full + mentions}
    # The procedures the runbook must keep (a renamed verb fails the parse above; a removed
    # procedure fails here).
    for verb in (
        ("endpoint", "add"), ("endpoint", "remove"), ("endpoint", "rotate-psk"),
        ("endpoint", "retire-psk"), ("group", "add"), ("peer", "add"), ("peer", "remove"),
        ("tpk", "rotate"), ("tpk", "retire"), ("revoke", "suspend"), ("revoke", "ticket"),
        ("store", "migrate"), ("store", "replica"), ("token", "check"), ("status",),
        ("call",), ("serve",),
    ):
        assert any(found[: len(verb)] == verb for found in documented), verb


def test_the_checker_catches_a_renamed_command_or_option() -> None:
    assert parse_error(["--home", "/var/lib/kms", "tpk", "rotate"]) is None
    assert "invalid choice" in (parse_error(["tpk", "roll"]) or "")
    assert "unrecognized arguments" in (parse_error(["tpk", "rotate", "--now"]) or "")
    assert kms_argvs("sudo -u kms /opt/kms/bin/kms tpk list  # comment") == [["tpk", "list"]]
    assert kms_argvs("docker exec kms kms-entrypoint endpoint list") == [["endpoint", "list"]]
    assert kms_argvs("kms mikey example | kms mikey decode -") == [
        ["mikey", "example"], ["mikey", "decode", "-"]
    ]
    assert kms_argvs("systemctl stop kms && kms status") == [["status"]]
    assert kms_argvs("systemctl stop kms") == []
    full, mentions = commands("```sh\nkms tpk \\\n    retire 1\n```\nsee `kms status --json`\n")
    assert full == [["tpk", "retire", "1"]] and mentions == [["status", "--json"]]


def links(text: str) -> list[str]:
    _, outside = split_fences(text)
    return [t for t in LINK.findall(outside) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("target", sorted(set(links(DOC.read_text(encoding="utf-8")))))
def test_relative_link_resolves(target: str) -> None:
    path, _, anchor = target.partition("#")
    file = (DOC.parent / path).resolve() if path else DOC
    assert file.exists(), f"{target}: no such file"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), f"{target}: no heading with that anchor"


def test_the_link_checker_knows_github_anchors() -> None:
    assert slug("Revocation: suspend endpoints, revoke tickets (`kms revoke`)") == (
        "revocation-suspend-endpoints-revoke-tickets-kms-revoke"
    )
    assert slug("3.10 Backup and restore") == "310-backup-and-restore"
    assert "kmstokendown" in anchors(ROOT / "docs" / "observability.md")
    assert len(links(DOC.read_text(encoding="utf-8"))) >= 20
