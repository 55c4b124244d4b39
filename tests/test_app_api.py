"""The app's API with gradio_client against a running server (offline, the demo trio).

What an outside caller sees: named endpoints with named parameters that default to the form's
values, a one-call chat, merges that only replace the served model when they succeed, bounded
input, escaped messages without server paths, saves that stay in the output folder, and a
showcase whose models nobody can change.
"""

from __future__ import annotations

import json

import pytest

from tests.app_server import ROOT

gradio_client = pytest.importorskip("gradio_client")
NO_MERGE = "No merged model yet"
EXPERT = "zh+ar+hi+sw"  # a language-group expert of the demo world (assets/demo/experts)
PUBLIC = {
    "/plan",
    "/merge",
    "/save",
    "/push",
    "/chat",
    "/evaluate",
    "/diagnose",
    "/represent",
    "/sweep",
}


@pytest.fixture(scope="module")
def app(app_server):
    return app_server


def client(url: str):
    return gradio_client.Client(url, verbose=False)


def test_every_public_endpoint_is_named_with_named_parameters(app):
    url, _ = app
    info = client(url).view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == PUBLIC
    assert not info["unnamed_endpoints"]
    for name, endpoint in info["named_endpoints"].items():
        for p in endpoint["parameters"]:
            assert not p["parameter_name"].startswith(("param_", "values")), (name, p)
    merge = {p["parameter_name"]: p for p in info["named_endpoints"]["/merge"]["parameters"]}
    assert merge["multimodal"]["parameter_default"] == "./assets/demo/multimodal"
    assert merge["method"]["parameter_default"] == "dim3"
    assert all(p["parameter_has_default"] for p in merge.values())
    chat = [p["parameter_name"] for p in info["named_endpoints"]["/chat"]["parameters"]]
    assert chat == ["message", "image", "max_new_tokens", "temperature", "top_p"]
    # No absolute server path anywhere in what the API tells its callers.
    assert str(ROOT) not in json.dumps(info)


def test_merge_with_defaults_then_chat_in_one_call_with_a_picture(app):
    url, _ = app
    c = client(url)
    plan, log, status = c.predict(api_name="/merge")
    assert status.startswith("✅ Merged"), status
    assert "Merged:" in plan and str(ROOT) not in log + plan + status
    original, merged = c.predict("Welche Farbe?", api_name="/chat")
    assert original.strip() and merged.strip() and NO_MERGE not in merged
    picture = gradio_client.handle_file(str(ROOT / "assets" / "examples" / "red_circle.png"))
    original, merged = c.predict(
        "What colour is the shape?", image=picture, max_new_tokens=8, api_name="/chat"
    )
    assert original.strip() and merged.strip()
    assert original.strip().lower().startswith("red")  # the demo VLM sees the red circle


def test_a_failed_merge_leaves_the_served_models_alone(app):
    url, _ = app
    c = client(url)
    c.predict(api_name="/merge")
    before = c.predict("Welche Farbe hat die Form?", api_name="/chat")
    *_, status = c.predict(base="/etc", api_name="/merge")
    assert status.startswith("❌") and "outside the allowed folders" in status
    assert str(ROOT) not in status and "/etc" in status
    assert c.predict("Welche Farbe hat die Form?", api_name="/chat") == before


def test_over_long_messages_are_refused_with_the_limit(app):
    url, _ = app
    c = client(url)
    with pytest.raises(gradio_client.exceptions.AppError, match="limit is 4,000"):
        c.predict("x" * 1_000_000, api_name="/chat")
    # Under the character cap but longer than the demo model's 160-token context.
    with pytest.raises(gradio_client.exceptions.AppError, match="reads at most 160"):
        c.predict("rot blau grün " * 200, api_name="/chat")


def test_user_input_is_escaped_and_cut_in_messages(app):
    url, _ = app
    c = client(url)
    evil = '<img src="http://127.0.0.1:9/x.png"> [link](http://example.com) ' + "a" * 10_000
    _, status = c.predict(multimodal=evil, api_name="/plan")
    assert status.startswith("❌") and "<img" not in status and "](http" not in status
    assert "at most 300" in status and len(status) < 700
    _, status = c.predict(multimodal="bad\0name", api_name="/plan")
    assert "control character" in status and "null byte" not in status
    _, status = c.predict(dare_ties_seed=-5, method="dare_ties", api_name="/plan")
    assert "seed" in status, status


def test_save_refuses_a_symlink_and_writes_inside_the_output_folder(app, tmp_path):
    url, scratch = app
    c = client(url)
    outputs = scratch / "outputs"
    outputs.mkdir(exist_ok=True)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (outputs / "escape").symlink_to(target, target_is_directory=True)
    _, status = c.predict(folder="escape", overwrite=True, api_name="/save")
    assert status.startswith("❌") and "symbolic link" in status
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    log, status = c.predict(folder="kept", api_name="/save")
    assert status.startswith("✅") and str(scratch) not in log + status
    assert (outputs / "kept" / "dim3_recipe.json").is_file()


def test_documented_api_example_matches_the_endpoints():
    readme = (ROOT / "docs" / "app.md").read_text()
    assert 'Client("http://127.0.0.1:7860/")' in readme
    assert 'api_name="/merge"' in readme and 'api_name="/chat"' in readme


def test_plan_and_merge_take_several_multilingual_experts(app):
    url, _ = app
    c = client(url)
    info = c.view_api(return_format="dict", print_info=False)["named_endpoints"]["/merge"]
    names = [p["parameter_name"] for p in info["parameters"]]
    assert "multilingual_2" in names and "multilingual_4_revision" in names
    expert = "./assets/demo/experts/" + EXPERT
    plan, *_ = c.predict(multilingual_2=expert, api_name="/plan")
    assert "Multilingual models: 2" in plan, plan
    plan, log, status = c.predict(multilingual_2=expert, api_name="/merge")
    assert status.startswith("✅ Merged"), status
    *_, status = c.predict(multilingual_2="./assets/demo/nowhere", api_name="/plan")
    assert status.startswith("❌") and "nowhere" in status and str(ROOT) not in status
    c.predict(api_name="/merge")  # leave the default merge served for the other tests


def test_a_wudi_merge_shows_its_optimisation_steps_as_it_runs(app):
    import time

    url, _ = app
    c = client(url)
    job = c.submit(method="wudi", wudi_iterations=100, api_name="/merge")
    seen: set[str] = set()
    while not job.done():
        for unit in job.status().progress_data or []:
            if unit.desc:
                seen.add(unit.desc)
        time.sleep(0.05)
    *_, status = job.result()
    assert status.startswith("✅ Merged"), status
    steps = [d for d in seen if "step " in d and "/100" in d]
    assert steps, seen  # the bar moved inside tensors, not only between them
    c.predict(api_name="/merge")  # leave the default merge served for the other tests


def test_sweep_errors_echo_the_grid_escaped(app):
    url, _ = app
    c = client(url)
    status, *_ = c.predict(grid="density=**big**", probe="", api_name="/sweep")
    assert status.startswith("❌") and "'**big**'" not in status, status
    assert r"\*\*big\*\*" in status, status  # shown literally, not as bold
