"""MkDocs hooks of the documentation site (mkdocs.yml ``hooks:``; excluded from the site itself).

- The notebooks live in ``notebooks/`` (where ``tests/test_notebooks.py`` runs them), outside
  ``docs/``: they are added to the site as ``notebooks/<name>.ipynb`` for mkdocs-jupyter,
  which executes and renders them with their outputs.
- Their kernel starts with XLA's CPU optimizations turned down, as in the test suite (the
  notebooks compile many tiny programs, ~2.5x faster so); matplotlib keeps the kernel's
  inline backend, so the figures are in the page.
- ``<!-- config-fields -->`` in a page becomes the table of every config field of
  ``configs/default.py``: its default, what it must be (``run_config.FIELD_CHECKS``), the
  comment beside it, and whether a resumed run may change it. Generated, so it cannot drift.
- ``<!-- top-level-names -->`` becomes the table of the names ``import anodev2_jax`` gives
  (its re-exports, and the lazily imported ones of its ``__getattr__``), each linked to its
  API entry with the first line of its docstring.
- The API reference covers the package: every module has a page with its ``::: module``
  directive, and each page renders every name of its module's ``__all__`` (checked on the
  rendered HTML; a miss is an error). ``tests/test_docs.py`` runs the first check without
  a build.
- The site loads nothing from the network: nbconvert's templates add MathJax and Mermaid
  from a CDN (the notebooks use neither), which are removed; any other remote script,
  stylesheet or image left in a page is an error (``mkdocs build --strict`` fails).
"""

from __future__ import annotations

import ast
import logging
import os
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

log = logging.getLogger("mkdocs.hooks.site")

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CONFIG_MARKER = "<!-- config-fields -->"
TOP_LEVEL_MARKER = "<!-- top-level-names -->"
REMOTE_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>\s*')
# nbconvert's Mermaid loader: an inline module that imports Mermaid from a CDN when a page has diagrams
REMOTE_MODULE = re.compile(r'<script type="module">(?:(?!</script>).)*?import\("https?://(?:(?!</script>).)*?</script>\s*', re.S)
REMOTE_ANY = re.compile(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="(?:https?:)?//[^"]*"|import\(["\']https?://', re.I)


def on_config(config):
    flags = os.environ.get("XLA_FLAGS", "")
    if FAST_COMPILE not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {FAST_COMPILE}".strip()
    return config


@event_priority(100)  # before mkdocs-jupyter's on_files, which turns .ipynb files into pages
def on_files(files, config):
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        # src_dir is the repository, not docs/: a File backed by notebooks/<name>.ipynb itself
        # (a File.generated one loses its path inside mkdocs-jupyter's wrapper)
        files.append(File(f"notebooks/{path.name}", str(REPO), config.site_dir, config.use_directory_urls))
    return files


def _default_fields() -> list[tuple[str, str, str]]:
    """``(field, section, comment)`` for each ``config.FIELD = ...`` of configs/default.py, in the file's order.

    The section is the ``# --- section: ...`` comment above the field. The comment is the
    one at the end of the field's line, else the comment lines just above it (the
    section's text after its colon included). ``ConfigDict.keys()`` is sorted, hence this.
    """
    fields, section, above = {}, "", []
    for line in (REPO / "configs" / "default.py").read_text().splitlines():
        stripped = line.strip()
        m = re.match(r"# --- ([^:]*):?\s*(.*)$", stripped)
        if m:
            section, above = m.group(1).strip(), [m.group(2)] if m.group(2) else []
            continue
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        f = re.match(r"config\.(\w+)\s*=[^#]*(?:#\s*(.*))?$", stripped)
        if f and f.group(1) not in fields:
            fields[f.group(1)] = (f.group(1), section, (f.group(2) or " ".join(above)).strip())
        above = []
    return list(fields.values())


def _cell(text: str) -> str:
    """``text`` for a Markdown table cell: ``|`` and ``*`` escaped outside code spans (inside, they are literal)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("|", "\\|").replace("*", "\\*") for p in parts)


def config_table() -> str:
    """Markdown tables of every field of configs/default.py, one per section of the file, in its order."""
    import importlib.util

    from anodev2_jax.run_config import FIELD_CHECKS, KNOB_FIELDS, RESUMABLE_FIELDS

    spec = importlib.util.spec_from_file_location("default_config", REPO / "configs" / "default.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    fields = _default_fields()
    listed = {name for name, _, _ in fields}
    for name in sorted(set(config.keys()) - listed):
        log.error("config field %s of configs/default.py is not set on a line of its own (config.%s = ...)", name, name)
    missing = sorted(set(config.keys()) ^ set(FIELD_CHECKS))
    if missing:
        log.error("config fields of configs/default.py and run_config.FIELD_CHECKS differ: %s", ", ".join(missing))
    out, last = [], None
    for name, section, comment in fields:
        if name not in config:
            continue
        if section != last:
            last = section
            out += ["", f"**{section}**", "", "| field | default | must be | notes | resume may change |", "|---|---|---|---|:-:|"]
        value = config[name]
        _, what = FIELD_CHECKS[name](value) if name in FIELD_CHECKS else (None, "?")
        if value is None:
            default = "None (the method's default)" if name in KNOB_FIELDS else "None"
        else:
            default = f"`{value!r}`"
        resumable = "yes" if name in RESUMABLE_FIELDS else ""
        out.append(f"| `{name}` | {_cell(default)} | {_cell(what)} | {_cell(comment)} | {resumable} |")
    return "\n".join(out).strip() + "\n"


def top_level_names() -> list[tuple[str, str]]:
    """``(name, defining module)`` of every name ``anodev2_jax/__init__.py`` imports, in its order."""
    names = []
    for node in ast.walk(ast.parse((REPO / "anodev2_jax" / "__init__.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("anodev2_jax."):
            names += [(a.asname or a.name, node.module) for a in node.names]
    return names


def _summary(module: str, name: str) -> str:
    path = REPO / Path(*module.split(".")).with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            line = (ast.get_docstring(node) or "").strip().splitlines()[0].replace("``", "`")
            return re.sub(r":\w+:`~?([\w.]+)`", r"`\1`", line)  # Sphinx roles, as code
    return ""


def top_level_table() -> str:
    rows = ["| name | defined in | what |", "|---|---|---|"]
    for name, module in top_level_names():
        page = module.split(".", 1)[1]
        rows.append(f"| [`anodev2_jax.{name}`][{module}.{name}] | [`{page}`]({page}.md) | {_cell(_summary(module, name))} |")
    return "\n".join(rows) + "\n"


def on_page_markdown(markdown, page, config, files):
    if CONFIG_MARKER in markdown:
        markdown = markdown.replace(CONFIG_MARKER, config_table())
    if TOP_LEVEL_MARKER in markdown:
        markdown = markdown.replace(TOP_LEVEL_MARKER, top_level_table())
    return markdown


DIRECTIVE = re.compile(r"^::: (anodev2_jax(?:\.\w+)*)\s*$", re.M)


def package_modules() -> list[str]:
    """Every module of the package (subpackages included, private ``_x`` ones not), dotted; not the top level."""
    root = REPO / "anodev2_jax"
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) > 1 and not any(p.startswith("_") for p in parts):
            out.append(".".join(parts))
    return out


def declared_all(module: str) -> list[str]:
    """The names in ``module``'s ``__all__`` (read from its source), or [] without one."""
    path = REPO / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    for node in ast.parse(path.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return list(ast.literal_eval(node.value))
    return []


def documented_modules(docs_dir: Path = REPO / "docs") -> dict[str, str]:
    """``{module: page}`` of every ``::: module`` directive under docs/api/."""
    found = {}
    for page in sorted((docs_dir / "api").rglob("*.md")):
        for m in DIRECTIVE.finditer(page.read_text()):
            found[m.group(1)] = page.relative_to(docs_dir).as_posix()
    return found


def missing_api_pages() -> list[str]:
    documented = documented_modules()
    return [m for m in package_modules() if m not in documented]


def on_nav(nav, config, files):
    for module in missing_api_pages():
        log.error("module %s has no API page: add docs/api/<name>.md with '::: %s' and list it in mkdocs.yml's nav", module, module)
    return nav


def on_page_content(html, page, config, files):
    documented = documented_modules()
    for module in DIRECTIVE.findall(page.markdown or ""):
        for name in declared_all(module):
            if f"{module}.{name}" in documented:  # a subpackage's submodule: rendered on its own page
                continue
            if f'id="{module}.{name}"' not in html:
                log.error("%s: %s.%s (in __all__) is not rendered", page.file.src_uri, module, name)
    html = REMOTE_MODULE.sub("", REMOTE_SCRIPT.sub("", html))
    for m in REMOTE_ANY.finditer(html):
        log.error("%s loads %s from the network; the site must work offline", page.file.src_uri, m.group(0))
    return html

