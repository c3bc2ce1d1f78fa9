"""Where headless mode reads manifests: a folder, or a git repository at a ref."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


class SourceError(RuntimeError):
    pass


class DirectorySource:
    def __init__(self, path: Path) -> None:
        self.path = path

    def checkout(self) -> Path:
        if not self.path.is_dir():
            raise SourceError(f"{self.path} is not a directory")
        return self.path

    def describe(self) -> str:
        return str(self.path)


class GitSource:
    """A shallow clone kept in a cache dir, fetched and reset to the ref on every pass."""

    def __init__(self, url: str, ref: str, cache_dir: Path, subdir: str = "") -> None:
        self.url, self.ref, self.subdir = url, ref, subdir
        self.dir = cache_dir / hashlib.sha256(url.encode()).hexdigest()[:16]
        self.revision = ""

    def _git(self, *args: str, cwd: Path | None = None) -> str:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0"}
        proc = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            # Never echo the URL: it may carry a token.
            raise SourceError(f"git {args[0]} failed: {proc.stderr.strip().splitlines()[-1:] or ['?']}")
        return proc.stdout

    def checkout(self) -> Path:
        if not (self.dir / ".git").exists():
            self.dir.parent.mkdir(parents=True, exist_ok=True)
            self._git("init", "-q", str(self.dir))
            self._git("remote", "add", "origin", self.url, cwd=self.dir)
        self._git("fetch", "-q", "--depth", "1", "origin", self.ref, cwd=self.dir)
        self._git("reset", "-q", "--hard", "FETCH_HEAD", cwd=self.dir)
        self.revision = self._git("rev-parse", "HEAD", cwd=self.dir).strip()
        return self.dir / self.subdir if self.subdir else self.dir

    def describe(self) -> str:
        return f"git ref {self.ref} at {self.revision[:12] or '?'}"
