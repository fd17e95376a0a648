"""Access keys come from an AWS-format credentials file (owner-only) or the environment; every
refusal is one line naming the file or variables, and never shows the secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from awsomefsd.tier.credentials import CredentialsError, load_credentials

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_credentials_file_and_its_profiles(tmp_path: Path) -> None:
    path = write(tmp_path / "creds", f"[default]\naws_access_key_id = AKID1\naws_secret_access_key = {SECRET}\n"
                 "[tier]\naws_access_key_id=AKID2\naws_secret_access_key=s2\naws_session_token=t2\n")
    assert load_credentials(path, environ={}).access_key_id == "AKID1"
    other = load_credentials(path, "tier", environ={})
    assert (other.access_key_id, other.secret_access_key, other.session_token) == ("AKID2", "s2", "t2")


def test_the_environment_when_there_is_no_file() -> None:
    creds = load_credentials(None, environ={"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": SECRET})
    assert (creds.access_key_id, creds.secret_access_key, creds.session_token) == ("AKID", SECRET, "")


@pytest.mark.parametrize(("text", "mode", "expected"), [
    (f"[default]\naws_access_key_id = A\naws_secret_access_key = {SECRET}\n", 0o644, "readable by others"),
    (f"[other]\naws_access_key_id = A\naws_secret_access_key = {SECRET}\n", 0o600, "no [default] section"),
    ("[default]\naws_access_key_id = A\n", 0o600, "needs aws_access_key_id and aws_secret_access_key"),
    (f"aws_secret_access_key = {SECRET}\n", 0o600, "not in the AWS credentials format"),
])
def test_bad_files_are_refused_in_one_line(tmp_path: Path, text: str, mode: int, expected: str) -> None:
    path = write(tmp_path / "creds", text, mode)
    with pytest.raises(CredentialsError) as caught:
        load_credentials(path, environ={})
    message = str(caught.value)
    assert expected in message and str(path) in message and "\n" not in message
    assert SECRET not in message


def test_missing_everything_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="AWS_ACCESS_KEY_ID"):
        load_credentials(None, environ={"AWS_ACCESS_KEY_ID": "only the id"})
    with pytest.raises(CredentialsError, match="No such file"):
        load_credentials(tmp_path / "absent", environ={})
