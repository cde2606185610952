"""Golden plans (`perfusion plan --json`), the plan's JSON shape, cache keys (R3), render order.

Plan fixtures live in tests/fixtures/plans/<case>/ with `expected.json`, the exact stdout of
`perfusion plan --json .` run in that folder; the examples in specs/ are compared with
tests/fixtures/plans/specs.expected.json. Rewrite both with `tests/regen_goldens.py --write`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from helpers import Run, png_bytes, write_tree
from regen_goldens import (
    PLAN_ARGV,
    REPO,
    SPECS,
    SPECS_ARGV,
    SPECS_EXPECTED,
    normalise,
    plan_cases,
)

from perfusion_dsl.compiler import compile_paths
from perfusion_dsl.diagnostics import render_all
from perfusion_dsl.keys import KEY_FORMAT, digest
from perfusion_dsl.nodes import Bare
from perfusion_dsl.options import GENERATE, GENERATE_DEFAULTS, LEARN, SCHEMA, Invalid
from perfusion_dsl.plan import LearnOptions, Plan, RenderOptions

CASES = plan_cases()

# The keys of the `plan --json` example in docs/language.md ("The plan"), in its order.
PLAN_KEYS = ["version", "concepts", "renders", "checkpoint_configs"]
CONCEPT_KEYS = ["token", "file", "line", "model", "supercategories", "adjectives", "images",
                "image_sha256", "mask_sha256", "options", "key", "up_to_date"]
RENDER_KEYS = ["file", "line", "model", "prompt", "concepts", "seed", "strength", "out",
               "options"]
# The learn option table of docs/language.md ("Options"); the generate options other than
# those a render step has as its own fields (seed, strength, out).
LEARN_OPTIONS = {"steps", "batch", "lr", "embedding_lr", "lock", "mask", "captions",
                 "resolution", "flip", "seed", "templates", "beta", "tau"}
RENDER_OPTIONS = {"steps", "guidance", "size", "negative"}


def test_there_are_enough_plan_cases() -> None:
    assert len(CASES) >= 4, CASES


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_plan_golden(case: Path, run_cli: Run) -> None:
    result = run_cli(case, *PLAN_ARGV)
    assert result.code == 0, result.err
    assert result.err == ""
    expected = (case / "expected.json").read_text("utf-8")
    assert normalise(result.out, case) == expected, (
        f"plan differs from {case.name}/expected.json; if intended, run "
        "tests/regen_goldens.py --write and review the diff")
    assert_shape(json.loads(result.out))


def test_specs_plan_golden(run_cli: Run) -> None:
    """The examples in specs/ compile and plan exactly as blessed."""
    assert any(SPECS.rglob("*.concept")), "specs/ must hold the example specs"
    result = run_cli(REPO, *SPECS_ARGV)
    assert result.code == 0, result.err
    plan = json.loads(result.out)
    assert_shape(plan)
    assert plan["concepts"] and plan["renders"]
    assert SPECS_EXPECTED.exists(), f"no {SPECS_EXPECTED.name}: run tests/regen_goldens.py --write"
    assert normalise(result.out, REPO) == SPECS_EXPECTED.read_text("utf-8"), (
        "the plan of specs/ changed; if intended, run tests/regen_goldens.py --write")


def assert_shape(plan: dict[str, Any]) -> None:
    """Exactly the keys of docs/language.md's plan example; the plan model accepts it back."""
    assert list(plan) == PLAN_KEYS
    assert plan["version"] == 2
    for concept in plan["concepts"]:
        assert list(concept) == CONCEPT_KEYS
        assert set(concept["options"]) == LEARN_OPTIONS
        assert len(concept["key"]) == 64 and int(concept["key"], 16) >= 0
        assert not os.path.isabs(concept["file"])
    for render in plan["renders"]:
        assert list(render) == RENDER_KEYS
        assert set(render["options"]) == RENDER_OPTIONS
        assert set(render["concepts"]) <= {c["token"] for c in plan["concepts"]}
        assert render["out"].endswith(".png") and not os.path.isabs(render["out"])
    assert Plan.model_validate(plan).model_dump(mode="json") == plan


def test_the_option_models_declare_every_option() -> None:
    """The plan's models are the one declaration of the options: the compiler's checks
    cover exactly their fields (a generate statement adds seed, strength and out)."""
    learn = {k for k, spec in SCHEMA.items() if LEARN in spec.kinds}
    generate = {k for k, spec in SCHEMA.items() if GENERATE in spec.kinds}
    assert learn == set(LearnOptions.model_fields) == LEARN_OPTIONS
    assert generate == set(RenderOptions.model_fields) | set(GENERATE_DEFAULTS)
    assert set(RenderOptions.model_fields) == RENDER_OPTIONS


def _edges(model: type[LearnOptions | RenderOptions], key: str) -> list[tuple[str, bool]]:
    """Values at and just past each declared bound, with whether they are inside."""
    out = []
    for rule in model.model_fields[key].metadata:
        for name, inside, past in (("ge", True, -1), ("gt", False, 1), ("le", True, 1)):
            bound = getattr(rule, name, None)
            if bound is not None:
                step = 1 if isinstance(bound, int) else 1e-3
                out += [(f"{bound}", inside), (f"{bound + past * step}", not inside)]
    return out


NUMERIC = [(model, key) for model in (LearnOptions, RenderOptions)
           for key, field in model.model_fields.items()
           if any(getattr(r, "le", None) is not None for r in field.metadata)]


@pytest.mark.parametrize(("model", "key"), NUMERIC, ids=[k for _, k in NUMERIC])
def test_the_compiler_checks_the_ranges_the_plan_declares(
        model: type[LearnOptions | RenderOptions], key: str) -> None:
    """At each bound of each numeric option the compiler and the plan model agree."""
    edges = _edges(model, key)
    assert len(edges) >= 4, edges
    multiple = next((r.multiple_of for r in model.model_fields[key].metadata
                     if getattr(r, "multiple_of", None)), None)
    for text, inside in edges:
        value = Bare(text)
        try:
            parsed = SCHEMA[key].parse(value, key)
        except Invalid:
            parsed = None
        fits = inside and (multiple is None or float(text) % multiple == 0)
        assert (parsed is not None) == fits, (key, text)
        if parsed is not None:
            assert getattr(model(**{key: parsed}), key) == parsed


def test_a_plan_of_another_format_is_refused_by_name() -> None:
    old = {"version": 1, "concepts": [], "renders": []}
    with pytest.raises(ValueError, match=r"version\n  Input should be 2"):
        Plan.model_validate(old)


# ----------------------------------------------------------------------------- R3 cache keys

SPEC = """\
model "toy:shapes"

learn photos/*.png as teddy* <teddy bear> adjectives: [fluffy, brown] {
  steps: 400
  lr: 0.0001
  lock: local
}
"""
IMAGES = {"photos/1.png": png_bytes((200, 30, 30)), "photos/2.png": png_bytes((30, 200, 30))}


def plan_of(folder: Path) -> Plan:
    comp = compile_paths([folder], folder)
    assert comp.ok, render_all(comp.diagnostics, comp.context.sources())
    return comp.plan()


def key_of(folder: Path, token: str = "teddy*") -> str:
    return next(c.key for c in plan_of(folder).concepts if c.token == token)


def changed(spec: str, old: str, new: str) -> str:
    assert old in spec, old
    return spec.replace(old, new)


def in_block(option: str) -> str:
    return changed(SPEC, "  lock: local\n", f"  lock: local\n  {option}\n")


# label: the files that differ from SPEC + IMAGES (the concept is always `teddy*`)
SAME_KEY: dict[str, Mapping[str, str | bytes]] = {
    "whitespace": {"a.concept": (
        'model   "toy:shapes"\n\n\n'
        "learn  photos/*.png  as  teddy*  < teddy  bear >  adjectives:[ fluffy ,brown ]{\n"
        "      steps:400,lr:   0.0001\n\n"
        "  lock:local,\n"
        "}\n\n")},
    "comments": {"a.concept": "# my teddy\n" + changed(
        SPEC, "  steps: 400\n", "  # long enough\n  steps: 400  # the paper's recipe\n")},
    "option order": {"a.concept": changed(
        SPEC, "  steps: 400\n  lr: 0.0001\n  lock: local\n",
        "  lock: local\n  lr: 0.0001\n  steps: 400\n")},
    "1e-4 for 0.0001": {"a.concept": changed(SPEC, "0.0001", "1e-4")},
    "1.0E-4 for 0.0001": {"a.concept": changed(SPEC, "0.0001", "1.0E-4")},
    "a default written out": {"a.concept": in_block("batch: 16")},  # toy:shapes' own default
    "options from defaults": {"a.concept": (
        'model "toy:shapes"\ndefaults {\n  lock: local\n  steps: 400\n}\n'
        "learn photos/*.png as teddy* <teddy bear> adjectives: [fluffy, brown] {\n"
        "  lr: 0.0001\n}\n")},
    "model left to the default": {"a.concept": SPEC.replace('model "toy:shapes"\n', "")},
    "a generate added": {"a.concept": SPEC + 'generate "teddy* at sea" {\n  strength: 0.9\n}\n'},
    "another concept added": {"a.concept": SPEC + "learn photos/1.png as bear* <bear>\n"},
    "images in another folder": {
        "a.concept": SPEC.replace("photos/*.png", "pics/*.png"), "photos/1.png": b"",
        "photos/2.png": b"", "pics/1.png": IMAGES["photos/1.png"],
        "pics/2.png": IMAGES["photos/2.png"]},
    "spec file renamed": {"a.concept": b"", "teddy.concept": SPEC},
}
DIFFERENT_KEY: dict[str, Mapping[str, str | bytes]] = {
    "one image changed": {"photos/2.png": png_bytes((30, 200, 31))},
    "an image added": {"photos/3.png": png_bytes((0, 0, 0))},
    "steps": {"a.concept": changed(SPEC, "steps: 400", "steps: 401")},
    "lr": {"a.concept": changed(SPEC, "lr: 0.0001", "lr: 0.0002")},
    "lock": {"a.concept": changed(SPEC, "lock: local", "lock: global")},
    "batch": {"a.concept": in_block("batch: 8")},
    "embedding_lr": {"a.concept": in_block("embedding_lr: 0.005")},
    "mask": {"a.concept": in_block("mask: attention")},
    "captions": {"a.concept": in_block("captions: photos/*.txt"),
                 "photos/1.txt": "a {} at sea", "photos/2.txt": "a {} in the snow"},
    "resolution": {"a.concept": in_block("resolution: 64")},
    "flip": {"a.concept": in_block("flip: false")},
    "seed": {"a.concept": in_block("seed: 1")},
    "templates": {"a.concept": in_block('templates: ["a photo of a {}"]')},
    "beta": {"a.concept": in_block("beta: 0.5")},
    "tau": {"a.concept": in_block("tau: 0.2")},
    "a training option from defaults": {"a.concept": changed(
        SPEC, 'model "toy:shapes"\n', 'model "toy:shapes"\ndefaults {\n  seed: 3\n}\n')},
    "adjectives": {"a.concept": changed(SPEC, "[fluffy, brown]", "[fluffy, grey]")},
    "adjective order": {"a.concept": changed(SPEC, "[fluffy, brown]", "[brown, fluffy]")},
    "no adjectives": {"a.concept": changed(SPEC, " adjectives: [fluffy, brown]", "")},
    "supercategory": {"a.concept": changed(SPEC, "<teddy bear>", "<teddy, bear>")},
    "another supercategory": {"a.concept": changed(SPEC, "<teddy bear>", "<teddy bear, toy>")},
    "model": {"a.concept": changed(SPEC, '"toy:shapes"', '"other/model"')},
}


def build(root: Path, changes: Mapping[str, str | bytes]) -> Path:
    files = {"a.concept": SPEC, **IMAGES, **changes}
    write_tree(root, {k: v for k, v in files.items() if v != b""})
    return root


@pytest.fixture(scope="module")
def base_key(tmp_path_factory: pytest.TempPathFactory) -> str:
    return key_of(build(tmp_path_factory.mktemp("base"), {}))


@pytest.mark.parametrize("label", list(SAME_KEY))
def test_R3_key_unchanged(label: str, base_key: str, tmp_path: Path) -> None:
    assert key_of(build(tmp_path, SAME_KEY[label])) == base_key


@pytest.mark.parametrize("label", list(DIFFERENT_KEY))
def test_R3_key_changed(label: str, base_key: str, tmp_path: Path) -> None:
    assert key_of(build(tmp_path, DIFFERENT_KEY[label])) != base_key


def test_R3_every_learn_option_is_in_the_key_matrix() -> None:
    in_matrix = {label for label in DIFFERENT_KEY if label in LEARN_OPTIONS}
    assert in_matrix == LEARN_OPTIONS


def test_R3_token_changes_the_key(base_key: str, tmp_path: Path) -> None:
    folder = build(tmp_path, {"a.concept": changed(SPEC, "teddy*", "ted*")})
    assert key_of(folder, "ted*") != base_key


def test_R3_caption_texts_change_the_key_and_their_paths_do_not(tmp_path: Path) -> None:
    spec = in_block("captions: words/*.txt")
    words = {"words/1.txt": "a {} at sea", "words/2.txt": "a {} in the snow"}
    first = key_of(build(tmp_path / "a", {"a.concept": spec, **words}))
    moved = key_of(build(tmp_path / "b", {
        "a.concept": in_block("captions: photos/*.txt"),
        **{k.replace("words/", "photos/"): v for k, v in words.items()}}))
    spaced = key_of(build(tmp_path / "c", {"a.concept": spec, **words,
                                          "words/2.txt": "a {}\n  in the snow\n"}))
    other = key_of(build(tmp_path / "d", {"a.concept": spec, **words,
                                         "words/2.txt": "a {} in the sand"}))
    assert first == moved == spaced  # the texts count, as the plan holds them
    assert other != first


def test_R3_mask_image_bytes_change_the_key(tmp_path: Path) -> None:
    spec = in_block("mask: masks/*.png")
    masks = {"masks/1.png": png_bytes((255, 255, 255)), "masks/2.png": png_bytes((0, 0, 0))}
    first = key_of(build(tmp_path / "a", {"a.concept": spec, **masks}))
    again = key_of(build(tmp_path / "b", {"a.concept": spec, **masks}))
    other = key_of(build(tmp_path / "c", {"a.concept": spec, **masks,
                                          "masks/2.png": png_bytes((0, 0, 1))}))
    assert first == again != other


def test_R3_attention_masks_of_the_earlier_rule_are_stale(tmp_path: Path) -> None:
    # the key as it was computed before the attention-mask rule entered it ("attention")
    plan = plan_of(build(tmp_path, {"a.concept": in_block("mask: attention")}))
    concept = next(c for c in plan.concepts if c.token == "teddy*")
    options = {k: list(v) if isinstance(v, tuple) else v
               for k, v in concept.options.model_dump().items() if k not in ("mask", "captions")}
    earlier = {"format": KEY_FORMAT, "token": "teddy*", "model": concept.model,
               "supercategories": list(concept.supercategories),
               "adjectives": list(concept.adjectives), "images": list(concept.image_sha256),
               "mask": "attention", "options": options}
    assert concept.key != digest(earlier)
    assert concept.key == digest({**earlier, "mask": "attention:2"})


def test_R3_touching_an_image_keeps_the_key(base_key: str, tmp_path: Path) -> None:
    folder = build(tmp_path, {})
    later = os.stat(folder / "photos/1.png").st_mtime + 3600
    for image in (folder / "photos").iterdir():
        os.utime(image, (later, later))
    assert key_of(folder) == base_key


def test_R3_moving_the_project_keeps_the_key(base_key: str, tmp_path: Path) -> None:
    folder = build(tmp_path / "here", {})
    moved = tmp_path / "somewhere" / "else"
    moved.parent.mkdir()
    shutil.move(folder, moved)
    assert key_of(moved) == base_key


def test_R3_key_is_stable_across_runs(base_key: str, tmp_path: Path) -> None:
    folder = build(tmp_path, {})
    assert key_of(folder) == key_of(folder) == base_key


# ----------------------------------------------------------------------------- render order


def test_render_order_prompts_then_strengths_then_k(tmp_path: Path) -> None:
    folder = write_tree(tmp_path, {"a.concept": (
        'let pets = [cat, dog]\n'
        'generate "a {pets} in {a forest|the snow|space}" x 2 {\n'
        "  strength: [0.9, 0.1]\n"
        "  seed: 40\n"
        "}\n")})
    renders = plan_of(folder).renders
    prompts = [f"a {pet} in {place}" for pet, place in
               itertools.product(["cat", "dog"], ["a forest", "the snow", "space"])]
    expected = [(p, s, 40 + k) for p, s, k in itertools.product(prompts, [0.9, 0.1], range(2))]
    assert [(r.prompt, r.strength, r.seed) for r in renders] == expected
    assert len({r.out for r in renders}) == len(renders)


def test_renders_follow_statement_order_across_files(tmp_path: Path) -> None:
    folder = write_tree(tmp_path, {
        "b.concept": 'generate "b one"\ngenerate "b two"\n',
        "a.concept": 'generate "a one"\n\ngenerate "a two"\n',
    })
    renders = plan_of(folder).renders
    assert [(r.file, r.line, r.prompt) for r in renders] == [
        ("a.concept", 1, "a one"), ("a.concept", 3, "a two"),
        ("b.concept", 1, "b one"), ("b.concept", 2, "b two")]


Writer = Callable[[Mapping[str, str | bytes]], Path]


def test_plan_with_errors_prints_no_json(project: Writer, run_cli: Run) -> None:
    folder = project({"a.concept": 'generate "a {x}"\n'})
    result = run_cli(folder, "plan", "--json", ".")
    assert result.code == 1
    assert result.out == ""
    assert "unknown list `x`" in result.err
