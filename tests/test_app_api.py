"""The app's API with gradio_client against a running server (offline, the demo trio).

What an outside caller sees: named endpoints with named parameters that default to the form's
values, a one-call chat, merges that only replace the served model when they succeed, bounded
input, escaped messages without server paths, saves that stay in the output folder, and a
showcase whose models nobody can change.
"""

from __future__ import annotations

import json
import os

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
    # every parameter defaults to the form's value but what only the caller can say
    required = {
        name: [
            p["parameter_name"] for p in endpoint["parameters"] if not p["parameter_has_default"]
        ]
        for name, endpoint in info["named_endpoints"].items()
    }
    assert {k: v for k, v in required.items() if v} == {
        "/chat": ["message"],
        "/save": ["folder"],
        "/push": ["repo_id", "token"],
    }
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
    original, merged, model = c.predict("Welche Farbe?", api_name="/chat")
    assert original.strip() and merged.strip() and NO_MERGE not in merged
    assert model.startswith("dim3 merge of ./assets/demo/multimodal · version ")
    picture = gradio_client.handle_file(str(ROOT / "assets" / "examples" / "red_circle.png"))
    original, merged, _ = c.predict(
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


def test_save_refuses_a_symlink_and_writes_inside_the_output_folder(app, tmp_path, monkeypatch):
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
    _, status = c.predict(folder="fisher", api_name="/save")  # where the server keeps Fishers
    assert status.startswith("❌") and "is the server's own" in status, status
    log, status = c.predict(folder="kept_model.v2", api_name="/save")
    assert status.startswith("✅") and str(scratch) not in log + status
    assert "Saved as `kept_model.v2` in" in status  # a code span shows it as typed: no "\_"
    # what a visitor may push to the Hub as it is names no server path, and still replays
    saved = outputs / "kept_model.v2"
    for name in ("dim3_recipe.json", "README.md"):
        text = (saved / name).read_text()
        assert str(ROOT) not in text and str(scratch) not in text, name
    from dim3.recipe import Recipe

    recipe = json.loads((saved / "dim3_recipe.json").read_text())
    assert recipe["local"] == {} and recipe["base"]["ref"].startswith("./assets/")
    monkeypatch.chdir(ROOT)  # replayed where the app runs: its folders as the visitor wrote them
    replayed = Recipe.load(saved / "dim3_recipe.json")
    assert (ROOT / replayed.base.ref).is_dir()


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


# -- the hardened public Space (issue 17) ------------------------------------------------------


def write_probe(folder, image: str):
    folder.mkdir(parents=True, exist_ok=True)
    line = {"image": image, "question": "Colour?", "answer": "red", "language": "en"}
    (folder / "probe.jsonl").write_text(json.dumps(line) + "\n")
    return folder / "probe.jsonl"


@pytest.fixture
def outside_png():
    """A real, readable PNG outside the app's allowed folders (not under pytest's base)."""
    import shutil
    import tempfile

    from PIL import Image

    folder = tempfile.mkdtemp(prefix="dim3-outside-")
    Image.new("RGB", (8, 8), (200, 0, 0)).save(os.path.join(folder, "outside.png"))
    yield os.path.join(folder, "outside.png")
    shutil.rmtree(folder, ignore_errors=True)


def test_files_named_inside_probe_and_parallel_files_stay_in_the_allowed_folders(
    app, tmp_path, outside_png
):
    url, _ = app
    c = client(url)
    outside = outside_png
    answers = []
    for image in ("/etc/passwd", "/etc/no_such_file_zz", "../../../../../../etc/passwd", outside):
        probe = write_probe(tmp_path / "p", image)
        status, *_ = c.predict(probe=str(probe), api_name="/evaluate")
        answers.append(status)
        # the same file as a Fisher merge's data: its pictures are read to estimate the Fishers
        *_, fisher_status = c.predict(
            method="fisher", fisher_data=str(probe), fisher_n=4, api_name="/merge"
        )
        answers.append(fisher_status)
        rows = [
            {"id": g, "language": lang, "text": "x", "image": image}
            for g in ("a", "b")
            for lang in ("en", "de")
        ]
        parallel = tmp_path / "p" / "parallel.jsonl"
        parallel.write_text("".join(json.dumps(r) + "\n" for r in rows))
        rep_status, *_ = c.predict(probe="file", probe_file=str(parallel), api_name="/represent")
        answers.append(rep_status)
    for status in answers:
        assert status.startswith("❌") and "outside the folders this server may read" in status
        assert (
            "passwd" not in status and "no\\_such" not in status and "not a readable" not in status
        )
        assert "does not exist" not in status
    # Whether the named file exists, or is a real picture, cannot be told from the answer.
    assert all(len(set(answers[i::3])) == 1 for i in range(3)), answers
    status, *_ = c.predict(probe="/etc/hostname", api_name="/evaluate")
    assert "probe file lies outside" in status and "checkpoint" not in status


@pytest.fixture
def outside_weights():
    """The demo base's weights and config outside the app's allowed folders."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="dim3-outside-")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(ROOT / "assets" / "demo" / "base" / name, folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_files_named_inside_a_checkpoint_folder_stay_in_the_allowed_folders(
    app, tmp_path, outside_weights
):
    """A folder under the allowed ones whose shard index names files elsewhere (an absolute
    path, one out through '..', a file that does not exist), or that holds links to files
    elsewhere: refused before any is opened, the same answer whether the file exists or not,
    and the merge served before untouched. (A Hub repository's index is read the same way.)"""
    import shutil

    from safetensors import safe_open

    url, _ = app
    c = client(url)
    demo = ROOT / "assets" / "demo" / "base"
    with safe_open(demo / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    secret = os.path.join(outside_weights, "model.safetensors")
    up = os.path.relpath(secret, tmp_path / "x")
    named = {"abs": secret, "up": up, "p1": "/etc/passwd", "p2": "/etc/passwe"}  # p2: no such
    answers = {}
    for case, target in [*named.items(), ("link", None), ("config", None), ("hidden", None)]:
        folder = tmp_path / case
        shutil.copytree(demo, folder)
        if target is not None:
            (folder / "model.safetensors").unlink()
            index = {"metadata": {}, "weight_map": dict.fromkeys(keys, target)}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        elif case == "link":
            (folder / "model.safetensors").unlink()
            (folder / "model.safetensors").symlink_to(secret)
        elif case == "hidden":  # a hidden folder is not entered, but is itself checked
            (folder / ".cache").symlink_to(outside_weights, target_is_directory=True)
        else:
            (folder / "config.json").unlink()
            (folder / "config.json").symlink_to(os.path.join(outside_weights, "config.json"))
        _, answers[case] = c.predict(base=str(folder), api_name="/plan")
    c.predict(api_name="/merge")
    before = c.predict("Welche Farbe hat die Form?", api_name="/chat")
    *_, status = c.predict(base=str(tmp_path / "abs"), api_name="/merge")
    assert status.startswith("❌") and "an index names shards beside it" in status, status
    assert c.predict("Welche Farbe hat die Form?", api_name="/chat") == before
    for case, status in answers.items():
        assert status.startswith("❌"), (case, status)
        assert "header" not in status and "is missing" not in status, (case, status)
        if case in ("link", "config", "hidden"):  # where a link leads is not told
            assert os.path.basename(outside_weights) not in status, (case, status)
    for case in named:
        assert "an index names shards beside it" in answers[case], answers[case]
    assert "leads out of the checkpoint's folder" in answers["up"]
    assert "not a relative file name" in answers["abs"]
    # Whether the named file exists, or is a real one, cannot be told from the answer.
    assert answers["p1"].replace("p1/", "p2/").replace("passwd", "passwe") == answers["p2"]
    for case, name in (
        ("link", "model.safetensors"),
        ("config", "config.json"),
        ("hidden", ".cache"),
    ):
        escaped = name.replace(".", "\\.")  # as the status's Markdown writes it
        assert f"holds '{escaped}', a link to a file outside the folders" in answers[case]


def _png_bytes(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_wrong_types_nan_and_unreadable_pictures_get_specific_messages(app, tmp_path):
    import time
    import urllib.request

    from PIL import Image

    url, _ = app
    c = client(url)
    AppError = gradio_client.exceptions.AppError
    with pytest.raises(AppError, match="ties_density must be a number, got 'abc'"):
        c.predict(method="ties", ties_density="abc", api_name="/plan")
    with pytest.raises(AppError, match="temperature must be a number, got 'hot'"):
        c.predict("hi", temperature="hot", api_name="/chat")
    # Out of range, not whole, a list for one choice: named before any work (a Fisher merge's
    # floor was refused only after its Fishers were estimated; the others ended in "Unexpected
    # error" or a message naming no parameter, with a traceback in the server's log)
    for kwargs, message in [
        ({"method": "ties", "ties_density": 5}, "ties_density must be from 0.01 to 1, got 5"),
        ({"method": "dare_ties", "dare_ties_seed": 1.5}, "must be a whole number, got 1.5"),
        ({"method": ["dim3"]}, "method must be one of the listed choices"),
        ({"method": "<b>x</b>"}, "method must be one of 'dim3', .*; got '&lt;b&gt;x"),
    ]:
        with pytest.raises(AppError, match=message) as refused:
            c.predict(**kwargs, api_name="/merge")
        assert "<b>" not in str(refused.value)
    plan, log, status = c.predict(method="fisher", fisher_floor=-1, api_name="/merge")
    assert status.startswith("❌") and "floor" in status, status
    assert "Fisher:" not in log, log  # refused before any Fisher was estimated
    fake = tmp_path / "fake.png"
    fake.write_text("not a picture")
    with pytest.raises(AppError, match="fake.png is not a readable image"):
        c.predict("hi", image=gradio_client.handle_file(str(fake)), api_name="/chat")
    big = tmp_path / "big.png"
    Image.new("L", (12000, 12000)).save(big)
    start = time.perf_counter()
    with pytest.raises(AppError, match="12000×12000 pixels"):
        c.predict("hi", image=gradio_client.handle_file(str(big)), api_name="/chat")
    assert time.perf_counter() - start < 5  # the header is read, nothing is decoded
    # A few hundred bytes of PNG, within the pixel limit, that a processor would scale to
    # gigabytes (the shorter side up to its size, the longer one with it): refused from its
    # header, as is an elongated picture in a dataset or a probe's file.
    wide = tmp_path / "wide.png"
    Image.new("L", (400_000, 1)).save(wide)
    assert wide.stat().st_size < 2000
    start = time.perf_counter()
    with pytest.raises(AppError, match="400000×1 pixels, more than 50 times as long as it is wide"):
        c.predict("hi", image=gradio_client.handle_file(str(wide)), api_name="/chat")
    assert time.perf_counter() - start < 5
    from dim3.benchmarks import decode_image

    with pytest.raises(ValueError, match="1×60 pixels, more than 50 times"):
        decode_image(_png_bytes(Image.new("RGB", (1, 60))))
    assert decode_image(_png_bytes(Image.new("RGB", (1, 50)))).size == (1, 50)
    # NaN for an integer through the raw HTTP API: a message, not {"error": null}.
    info = c.view_api(return_format="dict", print_info=False)["named_endpoints"]["/plan"]
    data = [p["parameter_default"] for p in info["parameters"]]
    names = [p["parameter_name"] for p in info["parameters"]]
    data[names.index("wudi_iterations")] = float("nan")
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(
        url + "gradio_api/call/plan", data=body, headers={"Content-Type": "application/json"}
    )
    event = json.load(urllib.request.urlopen(request))["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/plan/{event}").read().decode()
    assert "wudi_iterations must be a finite number" in stream, stream
    # A lone surrogate (JSON carries it, no tokenizer takes it): named, not "Unexpected error".
    info = c.view_api(return_format="dict", print_info=False)["named_endpoints"]["/chat"]
    data = [p["parameter_default"] for p in info["parameters"]]
    data[0] = "\ud800 hi"
    body = json.dumps({"data": data}).encode()  # ASCII JSON: the surrogate as its escape
    request = urllib.request.Request(
        url + "gradio_api/call/chat", data=body, headers={"Content-Type": "application/json"}
    )
    event = json.load(urllib.request.urlopen(request))["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/chat/{event}").read().decode()
    assert "lone surrogate" in stream and "Unexpected" not in stream, stream
    # A picture named by a server path instead of uploaded: the parameter and the fix named.
    data = [p["parameter_default"] for p in info["parameters"]]
    data[:2] = ["hi", {"path": "/etc/hostname", "meta": {"_type": "gradio.FileData"}}]
    request = urllib.request.Request(
        url + "gradio_api/call/chat",
        data=json.dumps({"data": data}).encode(),
        headers={"Content-Type": "application/json"},
    )
    event = json.load(urllib.request.urlopen(request))["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/chat/{event}").read().decode()
    image = info["parameters"][1]["parameter_name"]
    assert f"the input {image} names a file this server was not sent" in stream, stream
    assert "/etc/hostname" not in stream and "check the parameters' types" not in stream
    # The message alone, without the chat's other inputs: what is missing is named.
    request = urllib.request.Request(
        url + "gradio_api/call/chat",
        data=json.dumps({"data": ["hi"]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    event = json.load(urllib.request.urlopen(request))["event_id"]
    stream = urllib.request.urlopen(f"{url}gradio_api/call/chat/{event}").read().decode()
    missing = f"sent 1, without {info['parameters'][1]['parameter_name']}, "
    assert f"takes {len(data)} inputs" in stream and missing in stream, stream


def test_heavy_jobs_over_the_time_budget_are_refused_before_they_start(app):
    import time

    url, _ = app
    c = client(url)
    before = c.predict("Welche Farbe?", api_name="/chat")[2]
    start = time.perf_counter()
    *_, status = c.predict(method="wudi", wudi_iterations=100_000, api_name="/merge")
    assert status.startswith("❌") and "would take about" in status and "not started" in status
    assert "DIM3\\_JOB\\_BUDGET" in status and "fewer iterations" in status
    assert time.perf_counter() - start < 120  # measured in seconds, not run for half an hour
    assert c.predict("Welche Farbe?", api_name="/chat")[2] == before  # nothing changed
    grid = "density=" + ",".join(f"0.{i:04d}" for i in range(1, 1001))
    status, *_ = c.predict(grid=grid, probe="", api_name="/sweep")
    assert status.startswith("❌") and "1,000 values" in status


def test_saves_belong_to_their_session_and_push_takes_only_its_own(app):
    url, scratch = app
    alice, bob = client(url), client(url)
    folder = scratch / "outputs" / "alice-merge"
    _, status, *_ = alice.predict(folder="alice-merge", api_name="/save")
    assert status.startswith("✅"), status
    recipe = (folder / "dim3_recipe.json").read_text()
    _, status, *_ = bob.predict(
        folder="alice-merge", overwrite=True, method="ties", api_name="/save"
    )
    assert status.startswith("❌") and "not saved from this browser session" in status
    assert (folder / "dim3_recipe.json").read_text() == recipe  # still Alice's model
    status = bob.predict(repo_id="bob/x", token="hf_fake", api_name="/push")
    assert "nothing to push yet" in status
    _, status, *_ = alice.predict(folder="alice-merge", overwrite=True, api_name="/save")
    assert status.startswith("✅"), status  # her own folder: she may overwrite it


def test_chat_names_the_merged_model_so_a_client_sees_a_swap(app):
    url, _ = app
    c, other = client(url), client(url)
    c.predict(api_name="/merge")
    *_, first = c.predict("Welche Farbe?", api_name="/chat")
    other.predict(method="linear", api_name="/merge")  # another visitor's merge
    *_, second = c.predict("Welche Farbe?", api_name="/chat")
    assert first.startswith("dim3 merge of") and second.startswith("linear merge of")
    v1, v2 = (int(t.split("version ")[1].split(" ")[0]) for t in (first, second))
    assert v2 == v1 + 1 and "merged at" in second
    c.predict(api_name="/merge")  # leave the default merge served for the other tests


def test_a_merge_queued_behind_a_cancelled_one_is_not_refused(app):
    import time

    url, _ = app
    c = client(url)
    job = c.submit(method="wudi", wudi_iterations=300, api_name="/merge")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not job.done():
        if any("step" in (u.desc or "") for u in job.status().progress_data or []):
            break
        time.sleep(0.05)
    job.cancel()
    *_, status = client(url).predict(api_name="/merge")
    assert status.startswith("✅ Merged"), status
    assert "another merge" not in status


def _page_events(url: str) -> tuple[dict, dict]:
    """The chat box's submit event and the answer's stream it starts, as the page finds them
    in ``/config`` (by the box's element id): ``{"fn": index, "trigger": component id}``."""
    import httpx

    config = httpx.get(url + "config").json()
    box = next(c["id"] for c in config["components"] if c["props"].get("elem_id") == "dim3-box")
    deps = config["dependencies"]
    asked = next(d for d in deps if [box, "submit"] in [list(t) for t in d["targets"]])
    stream = next(
        d
        for d in deps
        if d.get("trigger_after") == asked["id"] and d["outputs"][:2] == asked["outputs"][:2]
    )
    return {"fn": asked["id"], "trigger": box}, {"fn": stream["id"], "trigger": None}


def _as_the_page(url: str, session: str, event: dict, data: list) -> list[dict]:
    """Run one event as the browser does (``queue/join``, then the session's ``queue/data``
    stream) and return its messages up to ``process_completed``."""
    import httpx

    api = url + "gradio_api/"
    body = {"data": data, "fn_index": event["fn"], "trigger_id": event["trigger"]}
    joined = httpx.post(
        api + "queue/join", json=body | {"session_hash": session, "event_data": None}
    )
    joined.raise_for_status()
    event_id, messages = joined.json()["event_id"], []
    with httpx.stream(
        "GET", api + "queue/data", params={"session_hash": session}, timeout=120
    ) as s:
        for line in s.iter_lines():
            if line.startswith("data:") and (m := json.loads(line[5:])).get("event_id") == event_id:
                messages.append(m)
                if m["msg"] == "process_completed":
                    break
    return messages


def test_an_answer_ends_with_an_update_that_changes_nothing(app):
    """Gradio closes a stream with a message that carries its last update's values again, and
    sends it after whatever the session ran meanwhile (CI saw a Clear's empty panes overwritten
    by the answer that way). The chat's stream therefore ends with an update that leaves the
    panes, the box and the status as they are. Asked as the page asks, over the wire."""
    import uuid

    url, _ = app
    asked, stream = _page_events(url)
    session = uuid.uuid4().hex[:11]
    question = {"text": "What colour is the shape?", "files": []}
    added = _as_the_page(url, session, asked, [question, None, None, None, 0])
    turn = added[-1]["output"]["data"][-1]  # the question's id, as the page holds it
    messages = _as_the_page(url, session, stream, [None, None, None, None, turn, 0, 8, 0, 1])
    chunks = [m["output"]["data"] for m in messages if m["msg"] == "process_generating"]
    assert any('"assistant"' in json.dumps(c[:2]) for c in chunks), chunks  # it was answered
    closing = messages[-1]
    assert closing["msg"] == "process_completed" and closing["success"], closing
    shown = [v for v in closing["output"]["data"] if v is not None]  # None: session state
    assert shown and all(v == {"__type__": "update"} for v in shown), closing["output"]["data"]


GC_HOOK = """
import gc, os, sys
_log = open(os.environ["DIM3_TEST_GC_LOG"], "a", buffering=1)
def _seen(phase, info):
    if phase == "stop":
        main = sys.modules["__main__"]
        begun, built = hasattr(main, "gc"), hasattr(main, "demo")  # app.py's first and last lines
        _log.write(f"{int(begun)} {int(built)} {info['generation']} {gc.get_freeze_count()}\\n")
gc.callbacks.append(_seen)
"""


def test_the_server_sets_its_startup_objects_aside_and_still_collects(tmp_path):
    """``python app.py`` imports torch, transformers and gradio and builds the app with the
    garbage collector off, then sets those objects aside (``gc.freeze``) and turns it on again:
    no collection while they are made, and the collections of a served merge and chat never
    walk them, yet do happen (a server without a collector would keep every cycle it makes).
    Seen from a ``sitecustomize`` hook in the server's process."""
    from tests.app_server import running_app

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(GC_HOOK)
    log = tmp_path / "gc.log"
    env = {"PYTHONPATH": str(hook), "DIM3_TEST_GC_LOG": str(log)}
    with running_app(tmp_path, [ROOT / "assets", tmp_path], **env) as url:
        c = gradio_client.Client(url, verbose=False)
        *_, status = c.predict(api_name="/merge")
        assert status.startswith("✅ Merged"), status
        c.predict("Welche Farbe?", api_name="/chat")
    lines = [tuple(int(x) for x in line.split()) for line in log.read_text().splitlines()]
    # the interpreter's own start may collect, before app.py runs; app.py's imports never
    assert not [line for line in lines if line[:2] == (1, 0)], lines
    served = [line for line in lines if line[1] == 1]
    assert len([g for *_, g, _ in served if g == 2]) >= 1, served  # full ones too
    assert len(served) >= 20, served
    assert all(frozen > 200_000 for *_, frozen in served), served  # the startup's objects aside


def test_saves_stop_at_the_output_folders_limit_before_anything_is_written(tmp_path):
    """``$DIM3_MAX_SAVED`` bounds what the output folder holds in all, whoever saved it (the
    visitors' saves share the server's disk with its Hub cache): a save that would pass it is
    refused before anything is written, with the sizes; the saves already there stay."""
    import struct

    from dim3.sizes import human_size
    from tests.app_server import running_app

    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "earlier").mkdir()
    (outputs / "earlier" / "weights.safetensors").write_bytes(b"\0" * 1_000_000)  # counts
    with open(ROOT / "assets" / "demo" / "multimodal" / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    tensors = sum(
        v["data_offsets"][1] - v["data_offsets"][0]
        for k, v in header.items()
        if k != "__metadata__"
    )
    with running_app(tmp_path, [ROOT / "assets"], DIM3_MAX_SAVED="6MB") as url:
        c = client(url)
        _, first = c.predict(folder="first", api_name="/save")
        _, second = c.predict(folder="second", api_name="/save")
    assert first.startswith("✅"), first
    held = sum(p.stat().st_size for p in outputs.rglob("*") if p.is_file())
    second = second.replace("\\", "")  # the status line's Markdown escapes
    assert second.startswith("❌"), second
    assert f"saving this merge ({human_size(tensors)})" in second
    assert f"past the 6 MB it may hold ($DIM3_MAX_SAVED; {human_size(held)} saved already)" in (
        second
    )
    assert sorted(p.name for p in outputs.iterdir()) == ["earlier", "first"]  # nothing begun
