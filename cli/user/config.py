"""Where the CLI finds the service and its key: flags, then FINETUNE_URL / FINETUNE_API_KEY,
then the file `finetune login` writes ($XDG_CONFIG_HOME/finetune/config.json, else
~/.config/finetune/config.json), readable by the user alone (0600)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from client import DEFAULT_URL, Client


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "finetune" / "config.json"


def load() -> dict[str, Any]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}; run `finetune login` again") from exc
    return data if isinstance(data, dict) else {}


def save(url: str, api_key: str | None) -> Path:
    """Write the file with mode 0600 from the start (never world-readable, not even for a
    moment), its folder 0700."""
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "api_key": api_key}, f, indent=2)
    os.chmod(tmp, 0o600)  # whatever the umask made of it
    tmp.replace(path)
    return path


def resolve(url: str | None = None, api_key: str | None = None) -> tuple[str, str | None]:
    """(url, key): a flag wins, then the environment, then the saved file."""
    saved = load()
    url = url or os.environ.get("FINETUNE_URL") or saved.get("url") or DEFAULT_URL
    if api_key is None:
        api_key = os.environ.get("FINETUNE_API_KEY") or saved.get("api_key")
    return url.rstrip("/"), api_key or None


def make_client(url: str | None = None, api_key: str | None = None) -> Client:
    base, key = resolve(url, api_key)
    return Client(base, api_key=key or "")
