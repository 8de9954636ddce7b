"""A Griffe extension: the docstrings' Sphinx roles (:func:`x`, :class:`~a.b.C`) become site links.

The package's docstrings cross-reference in Sphinx's notation, which Markdown would print
as is (":func:" before the name). After the package is loaded, each role is resolved the
way a reader means it: a dotted ``anodev2_jax...`` path as written, otherwise a member of
the enclosing class, then of the enclosing module (including the names it imports, followed
to where they are defined), then of the package. A target that the API reference renders
(a module, a name in its module's ``__all__``, or a public member of such a class) becomes
a mkdocstrings cross-reference ``[`label`][path]``; any other (a private helper, a name of
another library) stays a code span without the role. ``~`` shows the last component only.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([\w.]+?)(\(\))?`")
PACKAGE = "anodev2_jax"


def _lookup(pkg: griffe.Module, path: str):
    if path != PACKAGE and not path.startswith(PACKAGE + "."):
        return None
    obj = pkg
    for part in path.split(".")[1:]:
        try:
            obj = obj.members[part]
        except (KeyError, AttributeError):
            return None
        if obj.is_alias:
            try:
                obj = obj.final_target
            except (griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
    return obj


def _rendered(obj) -> bool:
    """Whether the API reference has an anchor for ``obj`` (mkdocs.yml: filters: public)."""
    if obj.is_module:
        return True
    parent = obj.parent
    if parent is None:
        return False
    if parent.is_module:
        return parent.exports is not None and obj.name in parent.exports
    if parent.is_class:
        return not obj.name.startswith("_") and _rendered(parent)
    return False


def _resolve(pkg: griffe.Module, obj, target: str):
    scopes = []
    if obj.is_class:
        scopes.append(obj)
    node = obj
    while node is not None:
        if node.is_class or node.is_module:
            scopes.append(node)
        node = node.parent
    candidates = [target] if target.startswith(PACKAGE) else [f"{s.path}.{target}" for s in scopes]
    for path in candidates:
        found = _lookup(pkg, path)
        if found is not None and _rendered(found):
            return found
    return None


class SphinxRoles(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.name != PACKAGE:
            return
        seen = set()

        def visit(obj):
            if id(obj) in seen or obj.is_alias:
                return
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda m: self._link(pkg, obj, m), obj.docstring.value)
            for member in obj.members.values():
                visit(member)

        visit(pkg)

    @staticmethod
    def _link(pkg, obj, m: re.Match) -> str:
        short, target, call = m.group(1), m.group(2), m.group(3) or ""
        label = (target.rsplit(".", 1)[-1] if short else target) + call
        found = _resolve(pkg, obj, target)
        return f"[`{label}`][{found.path}]" if found is not None else f"`{label}`"
