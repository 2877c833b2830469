"""The README's examples run, and what it shows printed is what equiv prints.

The README is the first thing a user reads and copies from, so its Python blocks are
executed here in order, in one namespace (later blocks use earlier names, as a reader
would), its pytest block runs in a fresh project, its command lines parse, and its
quoted failure report is compared line by line with the report the quoted port
produces today. A change of behaviour or of wording that the README does not follow
fails here, naming the block.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import equiv
from equiv.cli import UsageError, build_parser

pytest_plugins = ["pytester"]

README = Path(__file__).resolve().parents[1] / "README.md"


def code_blocks(text: str) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` for every fenced block, ``line`` its opening fence's.

    Example:
      >>> code_blocks("a\\n```python\\nx = 1\\n```\\n")
      [('python', 'x = 1\\n', 2)]
    """
    blocks, lines, i = [], text.splitlines(keepends=True), 0
    while i < len(lines):
        fence = re.match(r"```(\w*)\s*$", lines[i])
        if fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:  # an unclosed fence is not a block
                break
            blocks.append((fence.group(1), "".join(lines[i + 1 : end]), i + 1))
            i = end
        i += 1
    return blocks


TEXT = README.read_text(encoding="utf-8")
BLOCKS = code_blocks(TEXT)
PYTHON = [(code, line) for lang, code, line in BLOCKS if lang == "python"]


def is_pytest_module(code: str) -> bool:
    return "@pytest.mark.equivalence" in code


def first_block(predicate) -> tuple[str, int]:
    found = [(code, line) for code, line in PYTHON if predicate(code)]
    assert found, "the README lost a block this test reads; update tests/test_readme.py"
    return found[0]


def test_the_readme_has_the_blocks_read_here():
    assert len(PYTHON) >= 4
    assert any(is_pytest_module(code) for code, _ in PYTHON)


def test_python_examples_run_each_on_its_own():
    # Each block in a fresh namespace, as a reader copies one (found in a user trial:
    # a block without its imports ran here only after the blocks before it).
    torch.manual_seed(1)
    for code, line in PYTHON:
        if is_pytest_module(code):
            continue
        namespace = {"__name__": "readme"}
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - re-raised with the block named
            raise AssertionError(
                f"the README's Python block at line {line} fails: {error!r}"
            ) from error


def test_pytest_example_passes_in_a_fresh_project(pytester):
    code, _ = first_block(is_pytest_module)
    pytester.makepyfile(test_from_readme=code)
    equiv.compare_backends()  # imports torch._dynamo for good (see test_pytest_plugin)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-m", "equivalence"
    )
    result.assert_outcomes(passed=1)


def command_lines(code: str) -> list[list[str]]:
    """Each ``equiv-compare`` command of a bash block, continuation lines joined and
    comments dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [
        shlex.split(line, comments=True)
        for line in joined.splitlines()
        if line.strip().startswith("equiv-compare")
    ]


def test_command_lines_parse():
    commands = [c for lang, code, _ in BLOCKS if lang == "bash" for c in command_lines(code)]
    assert len(commands) >= 3
    parser = build_parser()
    for command in commands:
        parser.parse_args(command[1:])  # raises UsageError on an unknown flag or value
    with pytest.raises(UsageError):
        parser.parse_args(["--no-such-flag"])


def test_listed_options_are_the_command_lines_options():
    # The "Options:" paragraph of "The command line" against the parser, both ways.
    start = TEXT.index("Options: ")
    paragraph = TEXT[start : TEXT.index("\n\n", start)]
    listed = set(re.findall(r"--[a-z][a-z0-9-]*", paragraph))
    parser = build_parser()
    known = {f for action in parser._actions for f in action.option_strings if f[:2] == "--"}
    known.discard("--help")
    assert listed - known == set(), "the README lists options the command lacks"
    assert known - listed == set(), "the command has options the README does not list"


def quoted_output(after: str) -> list[str]:
    """The lines of the first unlabelled block that follows the text ``after``."""
    start = TEXT.index(after)
    block = next(code for lang, code, line in code_blocks(TEXT[start:]) if lang == "")
    return block.splitlines()


def quote_mismatches(printed: list[str], begins: list[str], ends: list[str]) -> list[str]:
    """The quoted lines that the printed report does not have where the README says
    (``begins`` ends with a line ``...``, and ``ends`` closes the report)."""
    head = begins[:-1] if begins[-1:] == ["..."] else begins
    wrong = [f"begins: {q!r} != {p!r}" for q, p in zip(head, printed, strict=False) if q != p]
    wrong += [
        f"ends: {q!r} != {p!r}" for q, p in zip(ends, printed[-len(ends) :], strict=False) if q != p
    ]
    if len(printed) < len(head) + len(ends):
        wrong.append(f"the report has {len(printed)} lines, fewer than quoted")
    return wrong


def printed_report_of_the_quoted_port() -> list[str]:
    # The README quotes the report of its port with optax's l2_loss convention.
    code, line = first_block(lambda code: "check_jax_port" in code)
    original = "jnp.mean((out - y) ** 2)"
    assert original in code, f"README.md:{line}: the port's loss line changed"
    namespace: dict = {}
    port = code.replace(original, "jnp.mean(0.5 * (out - y) ** 2)")
    with pytest.raises(AssertionError) as raised:  # the block ends in assert_agree()
        exec(compile(port, f"README.md:{line} (l2_loss port)", "exec"), namespace)
    return str(raised.value).splitlines()


def test_quoted_failure_report_is_what_the_quoted_port_prints():
    begins, ends = quoted_output("it begins"), quoted_output("and ends with")
    assert begins[-1] == "..."
    printed = printed_report_of_the_quoted_port()
    assert quote_mismatches(printed, begins, ends) == []
    # The comparison can fail: one changed figure in the quote is found.
    altered = [begins[0].replace("36 of 54", "35 of 54"), *begins[1:]]
    assert quote_mismatches(printed, altered, ends) == [f"begins: {altered[0]!r} != {printed[0]!r}"]
