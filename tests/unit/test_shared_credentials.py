"""rigshift.credentials: the file the broker writes its first admin key to and the client reads."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from rigshift.credentials import credentials_path, lookup_api_key, save_api_key


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RIGSHIFT_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("RIGSHIFT_API_KEY", raising=False)
    return tmp_path / "home"


def test_the_path_follows_rigshift_home(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert credentials_path() == home / "credentials"
    monkeypatch.delenv("RIGSHIFT_HOME")
    assert credentials_path() == Path.home() / ".config" / "rigshift" / "credentials"


def test_a_saved_key_is_found_for_its_broker_and_as_the_default(home: Path) -> None:
    path = save_api_key("127.0.0.1:50051", "rsk_first")
    assert path == home / "credentials"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert lookup_api_key("127.0.0.1:50051") == "rsk_first"
    assert lookup_api_key("elsewhere:1") == "rsk_first"  # the default section
    save_api_key("elsewhere:1", "rsk_second", make_default=False)
    assert lookup_api_key("elsewhere:1") == "rsk_second"
    assert lookup_api_key("third:1") == "rsk_first"


def test_the_environment_wins(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_api_key("b:1", "rsk_file")
    monkeypatch.setenv("RIGSHIFT_API_KEY", " rsk_env ")
    assert lookup_api_key("b:1") == "rsk_env"


def test_no_file_or_a_broken_one_is_no_key(home: Path) -> None:
    assert lookup_api_key("b:1") == ""
    home.mkdir(parents=True)
    (home / "credentials").write_text("not an ini file\n[[[")
    assert lookup_api_key("b:1") == ""
    save_api_key("b:1", "rsk_new")  # a broken file is replaced, not fatal
    assert lookup_api_key("b:1") == "rsk_new"
