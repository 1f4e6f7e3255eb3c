"""The documentation site's API reference covers the public API.

The API pages (`docs/api/*.md`) list names one by one with mkdocstrings directives
(`::: jaxdeq.Name`); these tests read the directives (no MkDocs needed) and compare
them with the public names of `jaxdeq`, `jaxdeq.nn`, `jaxdeq.flax` and
`jaxdeq.equinox`. `make docs` builds the site itself, with `--strict`.
"""

import pathlib
import re
import types

import jaxdeq
import jaxdeq.equinox
import jaxdeq.flax
import jaxdeq.nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
API_PAGES = sorted((ROOT / "docs" / "api").glob("*.md"))
DIRECTIVE = re.compile(r"^:::[ \t]+(\S+)[ \t]*$", re.MULTILINE)
MODULES = (jaxdeq, jaxdeq.nn, jaxdeq.flax, jaxdeq.equinox)


def _public_names(module: types.ModuleType) -> set[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in vars(module) if not name.startswith("_")]
    return {
        f"{module.__name__}.{name}"
        for name in names
        if not isinstance(getattr(module, name), types.ModuleType)
    }


def _documented_names() -> list[str]:
    return [name for page in API_PAGES for name in DIRECTIVE.findall(page.read_text())]


def test_api_pages_exist():
    assert API_PAGES, "no API pages under docs/api/"
    assert _documented_names(), "no `::: jaxdeq.Name` directive in docs/api/*.md"


def test_every_public_name_is_in_the_api_reference():
    public = set().union(*map(_public_names, MODULES))
    missing = sorted(public - set(_documented_names()))
    assert not missing, (
        "public names missing from the API reference; add a `::: <name>` line to "
        f"the right page under docs/api/: {missing}"
    )


def test_api_reference_lists_only_public_names_once():
    public = set().union(*map(_public_names, MODULES))
    documented = _documented_names()
    unknown = sorted(set(documented) - public)
    assert not unknown, f"docs/api/ documents names that are not public: {unknown}"
    twice = sorted({name for name in documented if documented.count(name) > 1})
    assert not twice, f"documented on more than one API page or twice: {twice}"
