"""GPT-NeoX hyper-parameters as MLC's ``model_config``: one dataclass, written and read in one place.

Why: ``gen_config`` fills it from the Hugging Face config and writes it into mlc-chat-config.json
(``to_dict``: MLC's keys, in MLC's order); ``compile`` reads it back (``from_chat_config``) to build
the model. Before, the same fields were copied by hand from the HF reader into a dict and from the
dict into the compiler's own class. Free of TVM, so that planning and gen_config stay light.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from neox_mlc.common import WorkflowError

DEFAULT_MAX_BATCH_SIZE = 128
# gen_config's prefill chunk: min(context window, this); planning checks package-config overrides against it
MAX_PREFILL_CHUNK = 8192


@dataclass(frozen=True)
class NeoXConfig:
    """``model_config`` of a GPT-NeoX mlc-chat-config.json; field order is MLC's key order."""

    use_parallel_residual: bool
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_hidden_layers: int
    layer_norm_eps: float
    vocab_size: int
    rotary_pct: float
    position_embedding_base: int | float
    context_window_size: int
    head_dim: int
    prefill_chunk_size: int
    tensor_parallel_shards: int = 1
    ffn_out_dtype: str = "float32"
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    # How the host library is built, not a hyper-parameter: never written to the chat config.
    dequantize_rows: bool = field(default=False, metadata={"compile_only": True})
    polynomial_erf: bool = field(default=False, metadata={"compile_only": True})
    int16_dot: bool = field(default=False, metadata={"compile_only": True})  # neox_mlc/cpu_gemv.py's decode GEMVs
    host_matmul: bool = field(default=False, metadata={"compile_only": True})  # neox_mlc/cpu_gemm.py's float-weight kernels (prefill; long-row decode)

    def to_dict(self) -> dict[str, Any]:
        """The ``model_config`` object MLC writes (compile-only options left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata.get("compile_only")}

    @classmethod
    def from_chat_config(
        cls, cfg: dict[str, Any], dequantize_rows: bool = False, polynomial_erf: bool = False, int16_dot: bool = False, host_matmul: bool = False
    ) -> NeoXConfig:
        """The config a chat config was written with (older configs may lack the defaulted keys)."""
        known = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("compile_only")}
        return cls(**{k: v for k, v in cfg["model_config"].items() if k in known}, dequantize_rows=dequantize_rows, polynomial_erf=polynomial_erf, int16_dot=int16_dot, host_matmul=host_matmul)


def check_context_window(n: int, max_position_embeddings: int) -> None:
    """The context window (``max_seq_len``) must fit the model's positions: the one statement of the rule,
    checked at planning time when the model's config.json is known and again by gen_config."""
    if not 0 < n <= max_position_embeddings:
        raise WorkflowError(
            f"context window (max_seq_len) {n} is out of range; allowed: 1..{max_position_embeddings} "
            "(the model's max_position_embeddings)"
        )
