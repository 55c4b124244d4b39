"""Session fixtures: tiny real trios, built once per test session in a temporary folder."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
import torch

from tests.tiny_models import Trio, build_llava_trio, build_qwen2vl_trio, rewrite_to_new_layout

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# The layout cache (dim3.layout.layout_cache_dir) of this session and of every app or CLI it
# starts: a temporary folder, so that tests write nothing in the user's home and start cold.
_CACHE = tempfile.mkdtemp(prefix="dim3-test-cache-")
os.environ["DIM3_CACHE_DIR"] = _CACHE
# numba's cache of the compiled kernels (dim3/kernels.py) too, instead of dim3/__pycache__
os.environ["NUMBA_CACHE_DIR"] = os.path.join(_CACHE, "numba")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_llava_trio(tmp_path_factory) -> Trio:
    """LLaVA (Llama) trio, older key layout, padded VLM vocabulary, untied embeddings."""
    return build_llava_trio(tmp_path_factory.mktemp("llava"))


@pytest.fixture(scope="session")
def tiny_llava_new_layout_trio(tmp_path_factory) -> Trio:
    """LLaVA trio whose VLM is stored in the newer ``model.language_model.*`` layout."""
    trio = build_llava_trio(tmp_path_factory.mktemp("llava_new"), seed=3)
    rewrite_to_new_layout(trio.multimodal, "llava")
    return trio


@pytest.fixture(scope="session")
def tiny_qwen2vl_trio(tmp_path_factory) -> Trio:
    """Qwen2-VL (Qwen2) trio, older layout, tied embeddings."""
    return build_qwen2vl_trio(tmp_path_factory.mktemp("qwen2vl"))


@pytest.fixture(scope="session")
def tiny_qwen2vl_new_layout_trio(tmp_path_factory) -> Trio:
    """Qwen2-VL trio in the newer layout."""
    trio = build_qwen2vl_trio(tmp_path_factory.mktemp("qwen2vl_new"), seed=5)
    rewrite_to_new_layout(trio.multimodal, "qwen2_vl")
    return trio


@pytest.fixture(scope="session")
def app_server(tmp_path_factory):
    """``python app.py`` serving offline (demo trio; the session's temporary folders allowed),
    shared by the browser and API tests: (url, scratch folder)."""
    from tests.app_server import ROOT, running_app

    scratch = tmp_path_factory.mktemp("app")
    roots = [ROOT / "assets", tmp_path_factory.getbasetemp()]
    # a job budget of 4 minutes, not the default 10: WUDI's 100,000 iterations on the demo trio
    # take ~8-10 minutes on an idle 2-core machine, too close to 10 for the test that expects
    # them refused (test_heavy_jobs_over_the_time_budget_are_refused_before_they_start); the
    # demo's other jobs take seconds
    with running_app(scratch, roots, DIM3_JOB_BUDGET="240") as url:
        yield url, scratch


@pytest.fixture(scope="session")
def tiny_family_trios(tmp_path_factory):
    """``model_type -> Trio`` for today's VLM families (tests/tiny_families.py), each built once."""
    from tests.tiny_families import build_family_trio

    built: dict[str, Trio] = {}

    def get(model_type: str) -> Trio:
        if model_type not in built:
            root = tmp_path_factory.mktemp(f"family_{model_type}")
            built[model_type] = build_family_trio(model_type, root)
        return built[model_type]

    return get


@pytest.fixture(scope="session")
def tiny_gemma3_multimodal_base_trio(tmp_path_factory) -> Trio:
    """Gemma 3 trio whose base and multilingual model are Gemma3ForConditionalGeneration too."""
    from tests.tiny_families import build_family_trio

    return build_family_trio(
        "gemma3", tmp_path_factory.mktemp("gemma3_mm_base"), seed=7, multimodal_base=True
    )
