"""The docs stay true: README settings examples load, every settings key is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runner_gateway.settings import _SCHEMA, load_settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
REFERENCE = (ROOT / "docs" / "settings.md").read_text()


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("block", yaml_blocks(README))
def test_readme_settings_examples_are_valid(
    tmp_path: Path, block: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Key files the examples name, made as the README says (relative paths
    # are from the working directory, as when the gateway runs).
    monkeypatch.chdir(tmp_path)
    for path in re.findall(r"secretKeyPath: (\S+)", block):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("ab" * 32 + "\n")
        (tmp_path / path).chmod(0o600)
    (tmp_path / "example.yaml").write_text(block)
    settings = load_settings(tmp_path, env="example", environ={})
    assert settings.runners


@pytest.mark.parametrize(
    ("section", "key"),
    [(section, key) for section, keys in _SCHEMA.items() for key in keys],
)
def test_every_settings_key_is_in_the_reference(section: str, key: str) -> None:
    heading = "## runners" if section == "runner" else f"## {section}"
    part = REFERENCE.split(heading, 1)[1].split("\n## ", 1)[0]
    assert f"`{key}`" in part, f"{section}.{key} is missing from docs/settings.md"
