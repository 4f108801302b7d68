"""Bad input as a newcomer types it: one clean line on stderr, exit status 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapterkit.apps import cli


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["fintune"], "argument command: invalid choice: 'fintune'"),
        ([], "the following arguments are required: command"),
        (["finetune", "--seeds", "0"], "finetune: argument --seeds: expected a positive"),
        (["demo", "--steps", "0"], "demo: argument --steps: expected a positive"),
        (["plan", "--placement", "x"], "plan: argument --placement: invalid choice: 'x'"),
    ],
)
def test_usage_errors_name_the_program_once(args: list[str], start: str,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"adapterkit: error: {start}"), err
    assert err.count("adapterkit:") == 1 and "adapterkit: adapterkit" not in err, err
    command = args[0] if args and args[0] != "fintune" else None
    assert err.rstrip().endswith(f"(see adapterkit{' ' + command if command else ''} --help)")


def test_a_typo_of_the_command_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["fintune"]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in ("demo", "finetune", "plan")), err


@pytest.mark.parametrize("flag", ["--train", "--val"])
def test_a_missing_file_comes_before_its_missing_partner(flag: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    missing = tmp_path / "missing.csv"
    code = cli.main(["finetune", "--no-progress", flag, str(missing), "--out",
                     str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    # the file is named first, then the pairing: both need fixing, in that order
    assert err.startswith(f"adapterkit: error: {flag} {missing}: no such file"), err
    assert err.index("no such file") < err.index("give both --train and --val, or neither")
    assert not (tmp_path / "out").exists()
