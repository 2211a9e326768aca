"""One run record, written the same way wherever results are written.

Every results file of the toolkit (recipes' ``run_metrics.json``, the evaluation, the judge,
the benchmarks, ``control/``'s data statistics and suite runs) carries :func:`run_record`:
the command, the git revision (and whether the tree was dirty), the versions of the
libraries that shape the numbers, the lock file's hash, the machine and the date.

Secrets never reach a results file or a published artefact: :func:`redact` replaces the
value of any key that names a secret (``hub_token``, ``*_token``, ``password``, ...) and any
``--<secret> VALUE`` in a command line; :func:`run_record` and :func:`write_json` apply it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "REDACTED",
    "TRACKED_LIBRARIES",
    "current_command",
    "git_revision",
    "library_versions",
    "lock_hash",
    "machine_description",
    "redact",
    "redact_command",
    "run_record",
    "write_json",
]

REDACTED = "<redacted>"
#: Libraries whose versions are recorded (those absent are recorded as None).
TRACKED_LIBRARIES = ("torch", "numpy", "trl", "transformers", "peft", "datasets", "accelerate",
                     "gymnasium", "safety-gymnasium", "bullet-safety-gym")
_REPO_ROOT = Path(__file__).resolve().parents[2]
_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|authorization|credential)", re.I)
# Keys that contain a secret-like word but hold none.
_NOT_SECRET = re.compile(r"(^|_)(tokens?_per|num_tokens|max_new_tokens|max_tokens|tokenizer|token_id|pad_token|"
                         r"eos_token|bos_token|unk_token|tokens$|tokeni[sz]ed|tokeni[sz]ation)", re.I)


def _is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key)) and not _NOT_SECRET.search(key)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with every secret value replaced by ``<redacted>``."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if _is_secret_key(str(k)) and obj[k] not in (None, "", False) else redact(obj[k]))
                for k in obj}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def redact_command(argv: list[str] | str) -> str:
    """A command line with the value of every ``--<secret> VALUE`` / ``--<secret>=VALUE`` redacted."""
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    out, hide_next = [], False
    for arg in args:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        if arg.startswith("--"):
            name, eq, _ = arg[2:].partition("=")
            if _is_secret_key(name.replace("-", "_")):
                if eq:
                    out.append(f"--{name}={REDACTED}")
                else:
                    out.append(arg)
                    hide_next = True
                continue
        out.append(arg)
    return " ".join(shlex.quote(a) if a != REDACTED and not a.endswith(REDACTED) else a for a in out)


def current_command(argv: list[str] | None = None) -> str:
    """This process's command line, redacted (``accelerate launch`` when launched by it)."""
    argv = sys.argv if argv is None else argv
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ or "LOCAL_RANK" in os.environ
    prog = argv[0] if argv else ""
    if not launched and prog.endswith("__main__.py"):  # python -m package
        module = _module_of(prog)
        head = ["python", "-m", module] if module else ["python", prog]
    else:
        head = ["accelerate", "launch", prog] if launched else ["python", prog]
    return redact_command(head + list(argv[1:]))


def _module_of(path: str) -> str | None:
    # The dotted module of a package's __main__.py, relative to the sys.path entry it was found under.
    folder = Path(path).resolve().parent
    best: tuple[str, ...] | None = None
    for entry in sys.path:
        try:
            parts = folder.relative_to(Path(entry or ".").resolve()).parts
        except (ValueError, OSError):
            continue
        if parts and (best is None or len(parts) < len(best)):
            best = parts
    return ".".join(best) if best else None


def git_revision(root: str | os.PathLike | None = None) -> str | None:
    """``HEAD``'s commit (``+dirty`` when tracked files changed), or None outside a git checkout."""
    root = Path(root) if root is not None else _REPO_ROOT
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def library_versions(names: tuple[str, ...] = TRACKED_LIBRARIES) -> dict[str, str | None]:
    """Installed versions (from package metadata: nothing is imported)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def lock_hash(path: str | os.PathLike | None = None) -> str | None:
    """sha256 of ``requirements/lock.txt`` (first 16 hex digits), or None when there is none."""
    path = Path(path) if path is not None else _REPO_ROOT / "requirements" / "lock.txt"
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def machine_description() -> str:
    """``"<CPU or GPU name>, <n> cores, <OS> <arch>, Python <version>"``."""
    where = "CPU"
    if "torch" in sys.modules:  # never import torch just to describe the machine
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            where = torch.cuda.get_device_name(0)
    return f"{where}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python {platform.python_version()}"


def run_record(command: str | None = None, **extra: Any) -> dict[str, Any]:
    """``{"command", "git_revision", "versions", "lock_sha256", "machine", "date"}`` (+ ``extra``), redacted."""
    record = {
        "command": redact_command(command) if command is not None else current_command(),
        "git_revision": git_revision(),
        "versions": library_versions(),
        "lock_sha256": lock_hash(),
        "machine": machine_description(),
        "date": _dt.date.today().isoformat(),
    }
    record.update(extra)
    return redact(record)


def write_json(path: str | os.PathLike, data: Any, *, indent: int = 2) -> Path:
    """Write ``data`` (redacted) as JSON atomically (a kill never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(redact(data), indent=indent, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)
