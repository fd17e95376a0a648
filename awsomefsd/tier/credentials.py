"""Where the object store's access keys come from: a credentials file in the AWS format (what
operators already have), or the AWS_* environment variables. Never from the TOML file, which is
world-readable by default and shows up in bug reports, and never logged (Credentials hides the
secret in its repr)."""

from __future__ import annotations

import configparser
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from awsomefsd.tier.sigv4 import Credentials

ENV_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_SECRET = "AWS_SECRET_ACCESS_KEY"
ENV_TOKEN = "AWS_SESSION_TOKEN"


class CredentialsError(ValueError):
    """No usable access key: one line saying where we looked."""


def load_credentials(path: Path | None, profile: str = "default",
                     environ: Mapping[str, str] | None = None) -> Credentials:
    """The key pair from `path` (section `profile`: aws_access_key_id, aws_secret_access_key and
    optionally aws_session_token), or else from the environment."""
    environ = os.environ if environ is None else environ
    if path is None:
        key_id, secret = environ.get(ENV_KEY_ID, ""), environ.get(ENV_SECRET, "")
        if not key_id or not secret:
            raise CredentialsError(f"no object store credentials: set [tier] credentials_file, or {ENV_KEY_ID} "
                                   f"and {ENV_SECRET} in the daemon's environment")
        return Credentials(key_id, secret, environ.get(ENV_TOKEN, ""))
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise CredentialsError(f"[tier] credentials_file {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CredentialsError(f"[tier] credentials_file {path}: readable by others (mode {stat.S_IMODE(mode):o}); "
                               f"chmod 600 it")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise CredentialsError(f"[tier] credentials_file {path}: not in the AWS credentials format "
                               f"({type(exc).__name__})") from None
    if not parser.has_section(profile):
        raise CredentialsError(f"[tier] credentials_file {path}: no [{profile}] section")
    section = parser[profile]
    key_id, secret = section.get("aws_access_key_id", "").strip(), section.get("aws_secret_access_key", "").strip()
    if not key_id or not secret:
        raise CredentialsError(f"[tier] credentials_file {path}: [{profile}] needs aws_access_key_id and "
                               f"aws_secret_access_key")
    return Credentials(key_id, secret, section.get("aws_session_token", "").strip())
