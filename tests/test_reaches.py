"""runner_gateway/edge/reaches.py: the list of our reaches beneath Twisted's public
API, checked against the installed Twisted."""

from __future__ import annotations

import pytest

import twisted
from runner_gateway.edge import fastpath, reaches, site  # site registers its fixes
from runner_gateway.edge.reaches import (
    COPIES,
    FINGERPRINTS,
    PRIVATE,
    REVIEWED,
    fingerprint,
    resolve,
)

_ORIGINALS = list(dict.fromkeys(copy.original for copy in COPIES))
_FIXES = set(fastpath.FIXES)


@pytest.mark.parametrize("original", _ORIGINALS)
def test_each_copied_original_is_the_source_we_reviewed(original: str) -> None:
    """Fails, naming our copy, when the installed Twisted's original differs
    from every release we reviewed our copy against."""
    found = fingerprint(resolve(original))
    copies = [copy for copy in COPIES if copy.original == original]
    reviewed = copies[0].reviewed()
    if found in reviewed.values():
        return
    ours = ", ".join(f"{copy.ours} (fastpath fix {copy.fix!r})" for copy in copies)
    pytest.fail(
        f"Twisted {twisted.__version__}: {original} is not the source we reviewed "
        f"(fingerprint {found}; reviewed: "
        + ", ".join(f"{release} {value}" for release, value in reviewed.items())
        + f"). Review our copy {ours} against it; once in line, add "
        f'"{original}": "{found}" under "{twisted.__version__}" in '
        "runner_gateway/edge/reaches.py FINGERPRINTS (python -m runner_gateway.edge.reaches).",
        pytrace=False,
    )


def test_every_reviewed_release_has_every_fingerprint() -> None:
    assert tuple(FINGERPRINTS) == REVIEWED
    for release, table in FINGERPRINTS.items():
        assert set(table) == set(_ORIGINALS), release


@pytest.mark.parametrize("copy", COPIES, ids=lambda copy: f"{copy.original}->{copy.ours}")
def test_each_copy_names_our_code_and_its_switch(copy: reaches.Copy) -> None:
    assert resolve(copy.ours) is not None
    assert copy.fix in _FIXES


def test_every_copy_site_installs_is_listed() -> None:
    """The methods a fix puts on the gateway's classes that do Twisted's work
    are in the list (helpers of our own are not copies)."""
    listed = {copy.ours.partition(":")[2] for copy in COPIES}
    ours_only = {
        "_idle_fired",
        "_whole_head_end",
        "hold",
        "write",
        "writeSequence",
        "loseConnection",
    }
    for fix, _, copies, names in site.COPIES:
        for name in names:
            if f"{copies.__name__}.{name}" not in listed:
                assert name in ours_only, (
                    f"{copies.__name__}.{name} ({fix}) is not in reaches.COPIES"
                )


@pytest.mark.skipif(
    twisted.__version__ not in REVIEWED, reason="names checked on the reviewed releases"
)
@pytest.mark.parametrize("entry", PRIVATE, ids=lambda entry: entry.name)
def test_each_private_name_is_there_on_a_reviewed_release(entry: reaches.Private) -> None:
    qualified = entry.name.partition(":")[2]
    if "()" in qualified or "/" in qualified:
        return  # instance attributes: checked by each fix's installer, and the copies' fingerprints
    assert resolve(entry.name) is not None
    assert entry.fix is None or entry.fix in _FIXES


def _compiled(source: str) -> object:
    namespace: dict[str, object] = {}
    exec(compile(source, "<test>", "exec"), namespace)
    return namespace["f"]


def test_fingerprints_ignore_layout_but_not_code(monkeypatch: pytest.MonkeyPatch) -> None:
    import inspect

    sources = {
        "plain": "def f(x):\n    return x + 1\n",
        "indented": "    def f(x):  \n\n        return x + 1\n",
        "changed": "def f(x):\n    return x + 2\n",
    }
    monkeypatch.setattr(inspect, "getsource", lambda obj: obj)
    prints = {name: fingerprint(source) for name, source in sources.items()}
    assert prints["plain"] == prints["indented"]
    assert prints["plain"] != prints["changed"]
