"""The platform's version and the code a run was made with (recorded in manifests and MLflow)."""

from __future__ import annotations

import subprocess
from pathlib import Path

__version__ = "0.1.0"


def code_version() -> dict[str, str]:
    """{"generalmodel": version, "git_sha": HEAD} (no git_sha outside a git checkout)."""
    version = {"generalmodel": __version__}
    repo = Path(__file__).resolve().parent.parent
    try:
        git = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return version
    if git.returncode == 0:
        version["git_sha"] = git.stdout.strip()
    return version
