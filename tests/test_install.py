"""The install contract: lock and pyproject agree, control/ is never installed top-level."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lock():
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements/lock.txt: {line!r} is not pinned with =="
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_declared_dependency_is_locked():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    for req in declared:
        name = re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0]
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key == "torch":
            continue  # installed first, CPU or CUDA build by scripts/setup_env.sh
        assert key in pins, f"{req} is declared in pyproject.toml but not pinned in requirements/lock.txt"


def test_lock_pins_the_tested_stack():
    pins = _lock()
    for name, version in {"trl": "1.16.0", "transformers": "5.23.0", "peft": "0.21.2", "safety-gymnasium": "1.0.0"}.items():
        assert pins.get(name) == version, (name, pins.get(name))


def test_control_is_not_installed_as_a_top_level_module(tmp_path):
    # From outside the repository `control` must not resolve to our package.
    code = "import importlib.util as u; s = u.find_spec('control'); print(s.origin if s else 'none')"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(ROOT / "control") not in out.stdout, out.stdout


def test_installed_package_is_llm_safepref_from_this_checkout():
    import llm_safepref

    assert Path(llm_safepref.__file__).resolve().is_relative_to(ROOT)


def _pinned_closure_gaps(name: str, pins: dict[str, str]) -> list[str]:
    """Requirements of installed ``name`` (no extras; markers evaluated here) that the lock lacks or pins otherwise."""
    from importlib import metadata

    from packaging.requirements import Requirement

    gaps = []
    for text in metadata.requires(name) or []:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key not in pins:
            gaps.append(f"{req.name} (required by {name}) is not pinned")
        elif not req.specifier.contains(pins[key], prereleases=True):
            gaps.append(f"{req.name}=={pins[key]} does not satisfy {name}'s {req}")
    return gaps


def test_matplotlib_is_declared_locked_and_installed_with_its_dependencies():
    """The model card's plot: matplotlib is a core dependency; the lock (installed --no-deps) holds it
    and every package it needs, at the versions installed."""
    from importlib import metadata

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0] == "matplotlib" for d in core), core
    pins = _lock()
    assert pins["matplotlib"].startswith("3.11.")
    assert _pinned_closure_gaps("matplotlib", pins) == []
    for name in ("matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing"):
        assert metadata.version(name) == pins[name], name


def test_every_phony_make_target_has_a_rule():
    text = (ROOT / "Makefile").read_text()
    phony = re.search(r"^\.PHONY:(.*)$", text, re.M).group(1).split()
    rules = set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.M))
    assert phony and [t for t in phony if t not in rules] == []
    assert "16 min" not in text  # the measured build time is 16–24 min
