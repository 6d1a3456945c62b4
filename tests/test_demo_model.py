"""The demo model ships inside the package, built from today's recipe, so a first start trains nothing."""

from __future__ import annotations

import json

from model_host.demo.build import DEMO_SPEC, PACKAGED_DEMO_DIR, packaged_demo_model, recipe_digest


def test_the_packaged_demo_model_is_built_from_the_current_recipe() -> None:
    # Fails when the corpus, template or spec changed without `python -m model_host.demo --package`.
    info = json.loads((PACKAGED_DEMO_DIR / "hfserve_build.json").read_text())
    assert info["recipe_sha256"] == recipe_digest(DEMO_SPEC)
    assert packaged_demo_model() == PACKAGED_DEMO_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (PACKAGED_DEMO_DIR / name).is_file(), name


def test_a_changed_recipe_is_not_served_from_the_package(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import model_host.demo.build as build

    monkeypatch.setattr(build, "recipe_digest", lambda spec: "something else")
    assert build.packaged_demo_model() is None
