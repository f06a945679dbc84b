"""The CLI layer: every verb is registered, and bonescreen's own errors become exit 1 with a message."""

import pytest

from bonescreen.cli import COMMANDS, build_parser, main


def test_every_verb_is_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    names = set(sub.choices)
    assert {c.replace("_", "-") for c in COMMANDS} <= names


def test_bonescreen_error_is_exit_1_with_message(tmp_path, capsys):
    # a DXA export without the required columns is a TableError, not a traceback
    csv = tmp_path / "dxa.csv"
    csv.write_text("id,date\n1,2020-01-01\n")
    (tmp_path / "img").mkdir()
    rc = main(["cohort", str(tmp_path / "out"), "--site", "S", str(tmp_path / "img"), str(csv)])
    assert rc == 1
    err = capsys.readouterr().err
    assert "bonescreen cohort: error:" in err and "patient_id" in err


def test_no_verb_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert "bonescreen" in capsys.readouterr().out
