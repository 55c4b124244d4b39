"""Save a merge to a folder and push it to the Hub: the handlers behind the Merge tab's
"Save to folder" and "Push to Hub".

Saving writes only inside the server's output folder (``dim3.paths.save_destination`` refuses
names that are paths and any symbolic link in the way, before the engine's writer runs), only
to a folder this browser session created (``dim3.ui.saves``), and only while the output folder
stays within ``$DIM3_MAX_SAVED`` in all (``dim3.limits.check_saved_room``). Pushing uploads the folder
this session saved last, exactly as it saved it, with a token the visitor types (never stored
or logged, blanked out of any error message).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from dim3 import engine
from dim3.limits import check_saved_room
from dim3.paths import save_destination
from dim3.recipe import code_span
from dim3.ui import jobs
from dim3.ui.common import AppContext, check_text, gpu, md_escape
from dim3.ui.fisher import data_free, with_fishers
from dim3.ui.form import MergeTab
from dim3.ui.progress import LOG_LINES, drive, err, ok, plain

REPO_ID_CHARS = 96
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def save_handler(ctx: AppContext, tab: MergeTab) -> Callable:
    @gpu(duration=300)
    def save(
        request: gr.Request,
        progress=gr.Progress(),  # noqa: B008
        folder: str = "",
        overwrite: bool = False,
        **values: Any,
    ) -> Iterator[dict]:
        """Merge to a new checkpoint folder inside the server's output folder."""
        log: list[str] = []
        out: dict = {}
        session = _session(request)
        name, dest = "", None
        try:
            budget = jobs.budget("save")
            name = check_text(folder, "folder name", 100)
            dest = save_destination(ctx.output_root, name)
            recipe = tab.form.recipe(data_free(values, tab.form.fixed is not None, tab.form))
            if dest.exists() and any(dest.iterdir()) and not overwrite:
                raise ValueError(
                    f"a folder named {name!r} already exists in the output folder; "
                    "choose another name or tick Overwrite"
                )
            ctx.saves.claim(name, session, dest.exists())  # another session's folder: refused
            yield from jobs.fetch(ctx, recipe, progress, log, tab.log_box, budget)
            recipe = yield from with_fishers(ctx, tab, recipe, values, budget, log)
            jobs.refuse_estimate(
                budget, recipe, [(recipe.method, recipe.options)], ctx.allowed_roots
            )
            merge_plan = engine.plan(recipe, allowed_roots=ctx.allowed_roots)
            check_saved_room(ctx.output_root, engine.output_nbytes(recipe, merge_plan))
            ctx.output_root.mkdir(parents=True, exist_ok=True)
            log.append(f"Writing the {recipe.method} merge to {name} in the output folder…")
            yield {tab.log_box: "\n".join(log), tab.status: "⏳ Saving…"}
            yield from drive(
                lambda cb: engine.merge_to_folder(
                    recipe,
                    save_destination(ctx.output_root, name),
                    overwrite=bool(overwrite),
                    progress=cb,
                    allowed_roots=ctx.allowed_roots,
                ),
                progress,
                log,
                tab.log_box,
                out,
                budget,
            )
            result = out["result"]
            ctx.saves.saved(name, session, result.out_dir)
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            if dest is not None:
                ctx.saves.release(name, session, dest)
            log.append(plain(ctx, exc))
            yield {tab.log_box: "\n".join(log[-LOG_LINES:]), tab.status: err(ctx, exc)}
            return
        log.append(f"Saved in {result.seconds:.1f} s.")
        yield {
            tab.log_box: "\n".join(log[-LOG_LINES:]),
            tab.saved: str(result.out_dir),
            tab.status: ok(
                f"Saved as {code_span(name)} in the output folder; it loads with "
                "`AutoModelForImageTextToText.from_pretrained`."
            ),
        }

    return save


def push_handler(ctx: AppContext, tab: MergeTab) -> Callable:
    def push(
        request: gr.Request,
        repo_id: str = "",
        token: str = "",
        private: bool = True,
        saved=None,
    ) -> dict:
        """Upload the folder saved last in this session to a Hub repository."""
        secret = (token or "").strip() if isinstance(token, str) else ""
        try:
            repo = check_text(repo_id, "Hub repository", REPO_ID_CHARS)
            if not saved or not Path(saved).is_dir():
                raise ValueError("nothing to push yet: save the merge to a folder first")
            ctx.saves.check_push(Path(saved), _session(request))  # exactly what it saved
            if not REPO_ID.match(repo):
                raise ValueError("the Hub repository must look like your-name/model-name")
            if not secret:
                raise ValueError(
                    "a Hub token with write access is needed to push; create one at "
                    "https://huggingface.co/settings/tokens"
                )
            url = upload(Path(saved), repo, secret, private=bool(private))
        except ValueError as exc:
            return {tab.status: err(ctx, exc)}
        except Exception as exc:  # noqa: BLE001 - the UI boundary
            text = ctx.public(hub_error_text(_without(exc, secret)))
            return {tab.status: f"❌ {md_escape(text, 600)}"}
        return {tab.status: ok(f"Pushed to [{md_escape(repo)}]({url}).")}

    return push


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "local"


def upload(folder: Path, repo_id: str, token: str, *, private: bool) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder`` to it; returns the repo URL."""
    from huggingface_hub import create_repo, upload_folder

    url = create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    upload_folder(
        repo_id=repo_id, folder_path=str(folder), token=token, commit_message="Upload DiM3 merge"
    )
    return str(url)


def hub_error_text(exc: BaseException) -> str:
    """Why a push to the Hub failed, in plain words."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return (
            f"the Hub refused the token (HTTP {status}): use a token with write access to that "
            "repository"
        )
    name = type(exc).__name__
    if "Connect" in name or "Timeout" in name or isinstance(exc, (ConnectionError, TimeoutError)):
        return "cannot reach the Hugging Face Hub (no network?); try again when online"
    return f"the push failed ({name}): {exc}"


def _without(exc: BaseException, secret: str | None) -> BaseException:
    """The exception, with the token blanked out of its message should it appear there."""
    if secret and secret.strip() and secret.strip() in str(exc):
        return RuntimeError(str(exc).replace(secret.strip(), "***"))
    return exc
