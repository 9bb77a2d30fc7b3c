"""Chat with a ``dist/<model>-<quant>`` bundle on the host CPU (its ``llvm`` library).

Why: a bundle is only proven by talking to it. Turns are formatted exactly as MLC's conversation
template does for the app — ``{role}{role_content_sep}{message}{sep}`` per turn, then the assistant
role followed by ``role_empty_sep`` — tokens are streamed as they decode, and generation stops on the
template's stop token ids or stop strings (the stop string itself is not printed). ``--prompt`` runs
one turn non-interactively for scripts and tests; without it, lines from stdin are successive turns.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import WorkflowError, read_json, run_cli
from neox_mlc.verify import verify_bundle


def format_prompt(template: dict[str, Any], history: list[tuple[str, str]], user_message: str) -> str:
    """The text MLC's conversation template produces for the next assistant turn."""
    text = template["system_template"].replace("{system_message}", template["system_message"])
    seps = template["seps"]
    roles = template["roles"]
    for user, assistant in history:
        text += f"{roles['user']}{template['role_content_sep']}{user}{seps[0]}"
        text += f"{roles['assistant']}{template['role_content_sep']}{assistant}{seps[-1]}"
    text += f"{roles['user']}{template['role_content_sep']}{user_message}{seps[0]}"
    return text + f"{roles['assistant']}{template['role_empty_sep']}"


def sample(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax with temperature and nucleus (top-p) filtering."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
    q = p[keep] / p[keep].sum()
    return int(rng.choice(keep, p=q))


class Chat:
    """A bundle loaded for conversation."""

    def __init__(self, bundle: str | Path) -> None:
        from tokenizers import Tokenizer

        from neox_mlc.runtime import ModelRuntime

        bundle = Path(bundle)
        verify_bundle(bundle)  # every file against MANIFEST.json's sha256, before anything is loaded
        libs = sorted((bundle / "lib").glob("*-llvm.so")) + sorted((bundle / "lib").glob("*-cpu.so"))
        if not libs:
            raise WorkflowError(f"bundle {bundle} has no host library (*-llvm.so); add llvm to extra_targets")
        apps = read_json(bundle / "bundle" / "mlc-app-config.json", "mlc-app-config.json")
        model_dir = bundle / "bundle" / apps["model_list"][0]["model_path"]
        self.config = read_json(model_dir / "mlc-chat-config.json", "chat config")
        self.template = self.config["conv_template"]
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.runtime = ModelRuntime(libs[0], model_dir, verify=False)  # its shards were just verified
        self.history: list[tuple[str, str]] = []

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        prefix = self.template.get("system_prefix_token_ids") or []
        return list(prefix) + ids

    def stream(self, message: str, max_tokens: int, temperature: float, seed: int) -> Iterator[str]:
        """Yield text pieces of the reply as they decode; stops on stop ids/strings or max_tokens."""
        rng = np.random.default_rng(seed)
        self.runtime.reset()
        prompt_ids = self.encode(format_prompt(self.template, self.history, message))
        room = self.runtime.context_window - len(prompt_ids)
        if room <= 0:
            raise WorkflowError(f"prompt of {len(prompt_ids)} tokens does not fit the context window {self.runtime.context_window}")
        logits = self.runtime.prefill(prompt_ids)
        stop_ids = set(self.template["stop_token_ids"])
        stop_strs = self.template["stop_str"]
        out_ids: list[int] = []
        emitted = ""
        for _ in range(min(max_tokens, room)):
            token = sample(logits, temperature, self.config.get("top_p", 1.0), rng)
            if token in stop_ids:
                break
            out_ids.append(token)
            text = self.tokenizer.decode(out_ids, skip_special_tokens=False)
            cut = min((text.find(s) for s in stop_strs if s in text), default=-1)
            if cut >= 0:
                if cut > len(emitted):
                    yield text[len(emitted) : cut]
                emitted = text[:cut]
                break
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield text[len(emitted) :]
                emitted = text
            if self.runtime.length >= self.runtime.context_window:
                break
            logits = self.runtime.decode(token)
        self.history.append((message, emitted))


def check_generation_args(prompt: str | None, max_tokens: int, temperature: float) -> None:
    """Refuse values that would silently produce nothing or crash mid-sampling, before loading a model."""
    if max_tokens < 1:
        raise WorkflowError(f"--max-tokens {max_tokens} is out of range; allowed: an integer >= 1")
    if prompt is not None and not prompt.strip():
        raise WorkflowError("--prompt is empty; allowed: a non-empty message")
    if not math.isfinite(temperature) or temperature < 0:
        raise WorkflowError(f"--temperature {temperature} is out of range; allowed: a finite number >= 0 (0 = greedy)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="dist/<model>-<quant> directory")
    ap.add_argument("--prompt", help="one user turn, non-interactive")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    check_generation_args(a.prompt, a.max_tokens, a.temperature)
    chat = Chat(a.bundle)
    turns = [a.prompt] if a.prompt is not None else (line.rstrip("\n") for line in sys.stdin)
    for turn in turns:
        if not turn:
            continue
        for piece in chat.stream(turn, a.max_tokens, a.temperature, a.seed):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
