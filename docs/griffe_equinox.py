"""Griffe extension: `__init__` signatures of Equinox modules, found statically.

An `eqx.Module` (like an optimistix solver or a `flax.linen.Module`) is a dataclass
without the `@dataclass` decorator, so griffe's own dataclass support does not see
the `__init__` that Equinox (or linen) generates from the annotated fields. This
extension builds it (fields of the class and of its jaxdeq parents, in order;
`eqx.field(default=...)` defaults), so that the API pages show e.g.
`Anderson(rtol, atol, norm=optx.max_norm, memory=5, ...)`. It also picks up the
optimistix idiom `Class.__init__.__doc__ = "..."` (the arguments of jaxdeq's
solvers), which static analysis does not see either.
"""

import ast
import pathlib
from typing import Any

import griffe

_MODULE_BASES = ("equinox.Module", "optimistix.", "flax.linen.Module")
_FIELD_CALLS = ("equinox.field", "dataclasses.field")


def _is_equinox_module(cls: griffe.Class, seen: set[str]) -> bool:
    if cls.path in seen:
        return False
    seen.add(cls.path)
    for base in cls.bases:
        path = base.canonical_path if isinstance(base, griffe.Expr) else str(base)
        if path.startswith(_MODULE_BASES):
            return True
        try:
            parent = cls.modules_collection[path]
        except (KeyError, griffe.AliasResolutionError):
            continue
        if isinstance(parent, griffe.Alias):
            parent = parent.final_target
        if isinstance(parent, griffe.Class) and _is_equinox_module(parent, seen):
            return True
    return False


def _field_parameters(cls: griffe.Class) -> list[griffe.Parameter]:
    parameters = []
    for member in cls.members.values():
        if member.is_alias or not member.is_attribute or member.annotation is None:
            continue
        if "instance-attribute" not in member.labels:
            continue  # griffe's label for `ClassVar[...]` attributes
        annotation = member.annotation
        if isinstance(annotation, griffe.Expr) and "AbstractVar" in str(annotation):
            continue
        default: Any = member.value
        value = member.value
        if isinstance(value, griffe.ExprCall) and value.canonical_path in _FIELD_CALLS:
            arguments = {
                a.name: a.value
                for a in value.arguments
                if isinstance(a, griffe.ExprKeyword)
            }
            if str(arguments.get("init")) == "False":
                continue
            default = arguments.get("default")
        parameters.append(
            griffe.Parameter(
                member.name,
                annotation=annotation,
                kind=griffe.ParameterKind.positional_or_keyword,
                default=default,
                docstring=member.docstring,
            )
        )
    return parameters


def _written_init(cls: griffe.Class) -> bool:
    init = cls.members.get("__init__")
    return init is not None and not init.extra["equinox_fields"].get("generated")


def _init_docstrings(module: griffe.Module) -> dict[str, str]:
    """`{"Class": text}` for each `Class.__init__.__doc__ = "text"` in `module`."""
    if not isinstance(module.filepath, pathlib.Path):  # a namespace package: a list
        return {}
    try:
        tree = ast.parse(module.filepath.read_text())
    except (OSError, SyntaxError):
        return {}
    found = {}
    for node in tree.body:
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            continue
        target = node.targets[0]
        if (
            isinstance(target, ast.Attribute)
            and target.attr == "__doc__"
            and isinstance(target.value, ast.Attribute)
            and target.value.attr == "__init__"
            and isinstance(target.value.value, ast.Name)
        ):
            found[target.value.value.id] = node.value.value
    return found


def _set_init(cls: griffe.Class, docstring: str | None) -> None:
    try:
        mro = cls.mro()
    except ValueError:
        mro = []
    if any(_written_init(c) for c in [cls, *mro]):
        return
    if not _is_equinox_module(cls, set()):
        return
    fields: dict[str, griffe.Parameter] = {}
    for klass in [*reversed(mro), cls]:
        for parameter in _field_parameters(klass):
            fields[parameter.name] = parameter
    init = griffe.Function(
        "__init__",
        lineno=0,
        endlineno=0,
        parent=cls,
        parameters=griffe.Parameters(
            griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword),
            *fields.values(),
        ),
        returns="None",
        docstring=None if docstring is None else griffe.Docstring(docstring),
    )
    init.extra["equinox_fields"]["generated"] = True
    cls.set_member("__init__", init)


def _visit(obj: griffe.Object, seen: set[str], docstrings: dict[str, str]) -> None:
    if obj.path in seen:
        return
    seen.add(obj.path)
    if isinstance(obj, griffe.Module):
        docstrings = _init_docstrings(obj)
    if isinstance(obj, griffe.Class):
        _set_init(obj, docstrings.get(obj.name))
    for member in obj.members.values():
        if not member.is_alias and (member.is_module or member.is_class):
            _visit(member, seen, docstrings)


class EquinoxFields(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        _visit(pkg, set(), {})
