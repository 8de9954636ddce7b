"""The documentation cannot rot: README.md and the pages of docs/ are checked without building the site.

- Every ``python`` block runs as written (each in a fresh namespace, under this suite's
  float64 / strict-promotion settings).
- Every ``bash`` command is checked, not run: ``train.py`` commands parse with train.py's
  own flags and their config passes ``run_config.validate_config`` and the method's knob
  checks; ``reproduce`` and ``viz`` commands parse with their argument parsers; benchmark
  scripts and shell scripts exist and know each flag passed to them; ``pip install`` names
  extras of pyproject.toml; ``pytest`` names existing tests and markers. A command of any
  other kind fails the test: teach it here how to check it.
- Links between the files resolve (files and ``#anchors`` of Markdown headings), and each
  ``[name][anodev2_jax.x.y]`` cross-reference names a module or a name of its ``__all__``.
- Every module of the package has an API page (``::: module``) listed in mkdocs.yml's nav.

``mkdocs build --strict`` (.ci/run) checks the rest on the rendered site: each API page
renders every name of its module's ``__all__``, links and anchors resolve, nothing loads
from the network, the notebooks execute.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
import shlex
import shutil
import tomllib
import types

import pytest
import yaml

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "hooks" not in p.parts)]
IDS = [p.relative_to(REPO).as_posix() for p in PAGES]


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_site_hooks", REPO / "docs" / "hooks" / "site.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.S | re.M)


# ----------------------------------------------------------------------------- python blocks


def test_readme_and_pages_have_python_examples():
    assert _blocks((REPO / "README.md").read_text(), "python"), "README has no python example"
    assert _blocks((REPO / "docs" / "own-code.md").read_text(), "python"), "docs/own-code.md has no python example"


# docs/guides: each guide's blocks build on each other (a user's whole model) and train a step;
# tests/test_guides.py runs them that way and checks what they compute.
EXAMPLE_PAGES = [p for p in PAGES if "```python" in p.read_text() and not p.is_relative_to(DOCS / "guides")]


@pytest.mark.standard_promotion  # a reader's code runs under JAX's defaults (Flax's and optax's layers mix in float32)
@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_python_examples_run(page):
    for block in _blocks(page.read_text(), "python"):
        exec(compile(block, str(page), "exec"), {"__name__": "docs_example"})


# ----------------------------------------------------------------------------- shell commands


def _commands(text: str) -> list[str]:
    """The commands of a page's bash blocks: continuation lines joined, comments dropped, split at ``&&``."""
    out = []
    for block in _blocks(text, "bash"):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            out += [c.strip() for c in line.split("&&") if c.strip()]
    return out


def _flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def _check_train(args: list[str]) -> str | None:
    from absl import flags
    from ml_collections import config_flags

    from anodev2_jax.methods import resolve_config
    from anodev2_jax.run_config import KNOB_FIELDS, validate_config

    path = next((a.split("=", 1)[1] if "=" in a else args[i + 1] for i, a in enumerate(args) if a.split("=")[0] == "--config"), None)
    if path is None:
        return "no --config"
    file = path.split(":", 1)[0]
    if not (REPO / file).is_file():
        return f"no config file {file}"
    argv = ["train.py", *args]  # train.py's flags, on a FlagValues of their own
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    flags.DEFINE_string("workdir", None, "", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "", flag_values=fv)
    fv(argv)
    config = fv.config
    validate_config(config)
    resolve_config(config.method, **{k: config[k] for k in KNOB_FIELDS})
    return None


def _check_reproduce(args: list[str]) -> str | None:
    from anodev2_jax import reproduce
    from anodev2_jax.data import DATASETS
    from anodev2_jax.methods import MODELS

    ns = reproduce.build_parser().parse_args(args)
    tables = reproduce.parse_tables(ns.table)
    if ns.model not in (*MODELS, "all"):
        return f"--model {ns.model}"
    if ns.dataset is not None and ns.dataset not in DATASETS:
        return f"--dataset {ns.dataset}"
    rows = [r for r, _, _ in reproduce.rows_for(tables)]
    unknown = [r for r in ns.only or () if r not in rows]
    return f"--only {unknown}" if unknown else None


def _check_source_flags(path: pathlib.Path, args: list[str]) -> str | None:
    if not path.is_file():
        return f"no file {path.relative_to(REPO)}"
    source = path.read_text()
    unknown = [f for f in _flags(args) if f'"{f}"' not in source]
    return f"{path.relative_to(REPO)} has no flag {', '.join(unknown)}" if unknown else None


def _check_command(command: str) -> str | None:
    """None if ``command`` checks out, else why not."""
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        words = words[1:]
    if words[:3] == ["python3", "-m", "venv"] or words[:1] in (["."], ["source"]):
        return None if words[-1].startswith(".venv") else f"unexpected venv path in {command!r}"
    if words[:2] == ["pip", "install"]:
        extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        for spec in words[2:]:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", spec)
            if m and not set(m.group(1).split(",")) <= set(extras):
                return f"pyproject.toml has no extra {m.group(1)}"
        return None
    if words[:1] == ["pytest"]:
        markers = {m.split(":")[0] for m in tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]}
        rest = words[1:]
        for i, a in enumerate(rest):
            if a == "-m":
                used = set(re.findall(r"\w+", rest[i + 1])) - {"not", "and", "or"}
                if not used <= markers:
                    return f"no pytest marker {used - markers}"
            elif not a.startswith("-") and (i == 0 or rest[i - 1] not in ("-m", "-k")):
                if not (REPO / a.split("::")[0]).exists():
                    return f"no test file {a}"
        return None
    if words[:2] == ["python", "train.py"]:
        return _check_train(words[2:])
    if words[:3] == ["python", "-m", "anodev2_jax.reproduce"]:
        return _check_reproduce(words[3:])
    if words[:3] == ["python", "-m", "anodev2_jax.viz"]:
        from anodev2_jax import viz

        viz.build_parser().parse_args(words[3:])
        return None
    if words[:3] == ["python", "-m", "anodev2_jax.models"]:
        return _check_source_flags(REPO / "anodev2_jax" / "models.py", words[3:])
    if len(words) >= 2 and words[0] == "python" and words[1].startswith("benchmarks/"):
        return _check_source_flags(REPO / words[1], words[2:])
    if len(words) >= 2 and words[0] == "bash" and words[1].endswith(".sh"):
        return _check_source_flags(REPO / words[1], words[2:])
    if words[:2] == ["jupyter", "execute"]:  # nbclient's jupyter-execute, which [dev] installs
        if shutil.which("jupyter-execute") is None:
            return "jupyter-execute (nbclient) is not installed"
        missing = [a for a in words[2:] if not a.startswith("-") and not (REPO / a).is_file()]
        return f"no notebook {', '.join(missing)}" if missing else None
    if words[:1] == ["mkdocs"] and words[1:2] in (["build"], ["serve"]):
        return None if (REPO / "mkdocs.yml").is_file() else "no mkdocs.yml"
    return f"no check for this kind of command; add one to tests/test_docs.py: {command!r}"


@pytest.mark.parametrize("page", [p for p in PAGES if "```bash" in p.read_text()], ids=lambda p: p.relative_to(REPO).as_posix())
def test_shell_commands_are_valid(page, monkeypatch):
    monkeypatch.chdir(REPO)  # config paths are relative to the repository, as the pages say
    failures = []
    for command in _commands(page.read_text()):
        try:
            why = _check_command(command)
        except (SystemExit, Exception) as e:  # argparse exits; config and flag errors raise
            why = f"{type(e).__name__}: {e}"
        if why:
            failures.append(f"{command}\n    {why}")
    assert not failures, "\n".join(failures)


def test_the_command_check_rejects_bad_commands(monkeypatch):
    monkeypatch.chdir(REPO)
    bad = [
        "python train.py --config configs/smoke.py --config.no_such_field=1",
        "python train.py --config configs/smoke.py --config.remat=sometimes",
        "python train.py --config configs/smoke.py:anodev2_conf1 --config.steps_z=3",  # aligned: steps_w=5 % 3
        "python train.py --config configs/missing.py",
        "python -m anodev2_jax.reproduce --table 3",
        "python benchmarks/step_time.py --no-such-flag 1",
        'pip install -e ".[nosuchextra]"',
        "pytest tests/test_nothing.py",
        "jupyter execute notebooks/no_such.ipynb",
        "rm -rf runs",
    ]
    for command in bad:
        try:
            why = _check_command(command)
        except (SystemExit, Exception) as e:
            why = repr(e)
        assert why, f"accepted {command!r}"
    assert _check_command("python train.py --config configs/smoke.py:anodev2_conf1 --config.steps_z=5 --config.steps_w=10") is None


# ----------------------------------------------------------------------------- links


def _slug(heading: str) -> str:
    from markdown.extensions.toc import slugify

    return slugify(re.sub(r"[`*]", "", re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)), "-")


def _anchors(path: pathlib.Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+?)\s*#*$", text, flags=re.M)}


@functools.cache
def _public_paths() -> frozenset[str]:
    hooks = _hooks()
    paths = {"anodev2_jax"}
    for module in hooks.package_modules():
        paths.add(module)
        paths.update(f"{module}.{name}" for name in hooks.declared_all(module))
    return frozenset(paths)


@pytest.mark.parametrize("page", PAGES, ids=IDS)
def test_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if DOCS in dest.parents and dest.relative_to(DOCS).parts[0] == "notebooks":
            dest = REPO / dest.relative_to(DOCS)  # the site takes the notebooks from notebooks/ (docs/hooks/site.py)
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor}")
    public = _public_paths()
    broken += [f"[...][{ref}]: not a module or a name of its __all__" for ref in re.findall(r"\]\[(anodev2_jax[\w.]*)\]", text) if ref not in public]
    assert not broken, f"{page.relative_to(REPO)}:\n  " + "\n  ".join(broken)


# ----------------------------------------------------------------------------- API reference


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_every_module_has_an_api_page_in_the_nav():
    hooks = _hooks()
    assert hooks.missing_api_pages() == [], "add docs/api/<name>.md with '::: <module>' for each"
    nav = _nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"])
    pages = set(hooks.documented_modules().values())
    assert pages <= set(nav), f"API pages missing from mkdocs.yml's nav: {sorted(pages - set(nav))}"
    missing = [p for p in nav if not (REPO / "docs" / p).is_file() and not p.startswith("notebooks/")]
    assert not missing, f"mkdocs.yml's nav names missing pages: {missing}"
    notebooks = [p for p in nav if p.startswith("notebooks/")]
    assert sorted(notebooks) == sorted(f"notebooks/{p.name}" for p in (REPO / "notebooks").glob("*.ipynb"))


def test_generated_tables_cover_every_config_field_and_top_level_name():
    from configs import default

    hooks = _hooks()
    table = hooks.config_table()
    for name in default.get_config().keys():
        assert f"| `{name}` |" in table, f"config field {name} is missing from the generated table"
    import anodev2_jax

    names = {n for n, _ in hooks.top_level_names()}
    exported = {n for n, v in vars(anodev2_jax).items() if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert exported <= names | {"get_model"} and "get_model" in names, exported - names
    assert hooks.top_level_table().count("\n") == len(names) + 2
