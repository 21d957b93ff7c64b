"""The subset of kustomize that deploy/kubernetes uses, to render it in tests.

No kustomize renderer installs from PyPI, npm or Debian for this Python
(PyPI's ``pykustomize`` needs 3.14, ``kustomize`` there generates manifests
rather than rendering them), so the tests render the overlays with this: the
kustomization keys ``resources`` (files and directories), ``patches``
(strategic-merge patch files) and ``images``, as kustomize v5 applies them.
Any other key in a kustomization is refused, so the manifests cannot start
using a feature this does not render. When a ``kustomize`` binary is on PATH
the tests compare its output with this one's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

__all__ = ["render"]

_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
# Strategic merge: lists of these fields merge item by item on this key
# (the patchMergeKey of the Kubernetes API); other lists are replaced.
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``directory``'s kustomization.yaml renders to."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _KEYS
    if unknown:
        raise ValueError(f"{directory}: kustomization keys not rendered here: {sorted(unknown)}")
    if kustomization.get("kind") != "Kustomization":
        raise ValueError(f"{directory}: not a Kustomization")
    objects: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    seen = set()
    for obj in objects:
        ident = (obj["kind"], obj["metadata"]["name"])
        if ident in seen:
            raise ValueError(f"{directory}: {ident} twice")
        seen.add(ident)
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"{directory}: only patches with a path are rendered here")
        patch = yaml.safe_load((directory / patch_entry["path"]).read_text())
        targets = [
            i
            for i, obj in enumerate(objects)
            if (obj["kind"], obj["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        if len(targets) != 1:
            raise ValueError(f"{directory}: patch {patch_entry['path']} matches {len(targets)}")
        objects[targets[0]] = _merge(objects[targets[0]], patch, "")
    for image in kustomization.get("images", []):
        for obj in objects:
            for container in _containers(obj):
                name = container["image"].split("@")[0].rsplit(":", 1)[0]
                if name == image["name"]:
                    new = image.get("newName", name)
                    if "newTag" in image:
                        new += f":{image['newTag']}"
                    container["image"] = new
    return objects


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return list(spec.get("containers", [])) + list(spec.get("initContainers", []))


def _merge(base: Any, patch: Any, field: str) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            elif key in merged:
                merged[key] = _merge(merged[key], value, key)
            else:
                merged[key] = value
        return merged
    key = _MERGE_KEYS.get(field)
    if key and isinstance(base, list) and isinstance(patch, list):
        merged_list = [dict(item) for item in base]
        for item in patch:
            match = [i for i, old in enumerate(merged_list) if old.get(key) == item.get(key)]
            if match:
                merged_list[match[0]] = _merge(merged_list[match[0]], item, "")
            else:
                merged_list.append(item)
        return merged_list
    return patch
