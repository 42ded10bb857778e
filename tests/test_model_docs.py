"""Every model's configuration surface is small and documented once, where a user looks for it.

Checked against the signatures, so a parameter added, renamed or removed without its documentation fails here:
- at most ``MAX_INIT_PARAMETERS`` Lightning ``__init__`` parameters (anomalib's own image models: median 10,
  maximum 23);
- each one named in the Lightning class docstring's ``Args:`` section;
- the model README's config-key table (``| `key` | default | meaning |``) lists exactly those keys, with the
  signature's default.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import yaml

import anomalib_ext.models as models

MAX_INIT_PARAMETERS = 17  # 15 until 0.7.0 added `image_tiling` to every local family, 16 until 0.13.0 gave
# TeacherStudent the `input_normalization` of the backbone families
# anomalib's own component arguments, documented by anomalib; a README may list them or not
ANOMALIB_COMPONENTS = {"pre_processor", "post_processor", "evaluator", "visualizer"}
MODEL_CLASSES = [getattr(models, name) for name in models.__all__]
TABLE_ROW = re.compile(r"^\|\s*`(?P<key>[a-z_0-9.]+)`\s*\|\s*(?P<default>[^|]*?)\s*\|")


def init_parameters(model_class: type) -> dict[str, inspect.Parameter]:
    parameters = inspect.signature(model_class.__init__).parameters
    return {name: parameter for name, parameter in parameters.items() if name != "self"}


def readme_of(model_class: type) -> Path:
    return Path(inspect.getfile(model_class)).with_name("README.md")


def readme_keys(model_class: type) -> dict[str, str]:
    """The first config-key table of the README: ``{key: default as written}`` (a nested key ``a.b`` is skipped:
    it documents a field of the argument ``a``). A README shared by several classes gives each its own table, after
    a heading that names the class in backticks (``### `DfkdmLake` ...``)."""
    keys: dict[str, str] = {}
    in_table = False
    lines = readme_of(model_class).read_text().splitlines()
    heading = f"`{model_class.__name__}`"
    start = next((i for i, line in enumerate(lines) if line.startswith("#") and heading in line), 0)
    for line in lines[start:]:
        if line.startswith("| key |"):
            in_table = True
            continue
        if in_table and line.startswith("|---"):
            continue
        if in_table:
            match = TABLE_ROW.match(line)
            if match is None:
                break
            if "." not in match["key"]:
                keys[match["key"]] = match["default"]
    return keys


def as_default(text: str) -> object:
    """A README default cell as a value: ``null`` -> None, ``[a, b]`` -> list, a quoted or plain word as is."""
    text = text.strip().strip("`")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):  # YAML 1.1 reads ``1e-3`` as a string
        try:
            return float(value)
        except ValueError:
            return value
    return value


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_at_most_seventeen_init_parameters(model_class: type) -> None:
    names = list(init_parameters(model_class))
    assert len(names) <= MAX_INIT_PARAMETERS, f"{model_class.__name__} has {len(names)} parameters: {names}"


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_every_parameter_is_in_the_class_docstring(model_class: type) -> None:
    doc = inspect.getdoc(model_class) or ""
    assert "Args:" in doc, f"{model_class.__name__} has no Args: section"
    args = doc.split("Args:", 1)[1]
    missing = [name for name in init_parameters(model_class) if not re.search(rf"\b{name}\b", args)]
    assert not missing, f"{model_class.__name__}'s docstring does not document {missing}"


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_readme_table_lists_exactly_the_parameters(model_class: type) -> None:
    documented = readme_keys(model_class)
    assert documented, f"{readme_of(model_class)} has no '| key | default | meaning |' table"
    parameters = set(init_parameters(model_class))
    assert set(documented) - parameters == set(), "README documents keys the class does not take"
    undocumented = parameters - set(documented) - ANOMALIB_COMPONENTS
    assert undocumented == set(), f"{readme_of(model_class)} does not document {sorted(undocumented)}"


@pytest.mark.parametrize("model_class", MODEL_CLASSES, ids=lambda cls: cls.__name__)
def test_readme_defaults_are_the_signature_defaults(model_class: type) -> None:
    parameters = init_parameters(model_class)
    wrong = {}
    for key, written in readme_keys(model_class).items():
        default = parameters[key].default
        if default is inspect.Parameter.empty or not isinstance(default, (bool, int, float, str, type(None), tuple)):
            continue  # objects (nested settings) are documented by their own fields
        expected = list(default) if isinstance(default, tuple) else default
        if as_default(written) != expected:
            wrong[key] = (written, default)
    assert not wrong, f"README default differs from the signature (written, actual): {wrong}"
