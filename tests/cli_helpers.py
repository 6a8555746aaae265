"""Helpers shared by the command-line tests."""
from __future__ import annotations


def assert_user_error(code, capsys, *words):
    """The command failed as a user error: exit code 2 and one ``harmon: error: ...`` line naming ``words``."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("harmon: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, err
