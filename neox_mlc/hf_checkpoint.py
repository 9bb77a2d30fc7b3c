"""Read a Hugging Face GPT-NeoX checkpoint without loading it: config fields and a tensor index.

Why a module of its own: the converter, gen_config, compile and the evaluation all need the same
architecture facts, and both spellings of the rotary settings must be read in one place
(transformers 5 writes ``rope_parameters.partial_rotary_factor`` / ``rope_theta``; older checkpoints,
the LINE model's included, have ``rotary_pct`` / ``rotary_emb_base``). The tensor index reads only
safetensors headers (or a ``weights_only`` mmap of PyTorch shards), so planning a conversion of a 7 GB
model touches kilobytes.
"""

from __future__ import annotations

import itertools
import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neox_mlc.common import WorkflowError, read_json
from neox_mlc.neox_config import NeoXConfig

SUPPORTED_ARCHITECTURES = ("GPTNeoXForCausalLM",)
_SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "BF16": "bfloat16", "F64": "float64", "BOOL": "bool"}
_ITEMSIZE = {"float16": 2, "float32": 4, "bfloat16": 2, "float64": 8, "bool": 1}
# Bytes per element of every safetensors dtype, to check a header's byte ranges even for tensors
# (buffers) the converter does not use.
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# Non-parameter buffers GPT-NeoX checkpoints of the transformers 4.2x era store next to the weights:
# the causal mask (bool), the masking constant and the rotary frequencies. They are recomputed by
# every runtime, so the converter skips them (LINE's 7.24 GB file holds 30 masks of 2048 x 2048).
BUFFER_PATTERN = re.compile(r"^gpt_neox\.(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|rotary_emb\.inv_freq)$")


def is_buffer(name: str) -> bool:
    """True for a known GPT-NeoX buffer (not a weight): ``attention.bias``, ``masked_bias``, ``inv_freq``."""
    return BUFFER_PATTERN.match(name) is not None


@dataclass(frozen=True)
class NeoXArch:
    """The GPT-NeoX hyper-parameters every later step needs, read from ``config.json``."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    rotary_pct: float
    rotary_emb_base: float
    layer_norm_eps: float
    use_parallel_residual: bool
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int | None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def model_config(self, context_window_size: int, prefill_chunk_size: int, max_batch_size: int) -> NeoXConfig:
        """MLC's ``model_config`` for this checkpoint: the one mapping from HF names to MLC's."""
        base = self.rotary_emb_base
        return NeoXConfig(
            use_parallel_residual=self.use_parallel_residual,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_attention_heads=self.num_attention_heads,
            num_hidden_layers=self.num_hidden_layers,
            layer_norm_eps=self.layer_norm_eps,
            vocab_size=self.vocab_size,
            rotary_pct=self.rotary_pct,
            position_embedding_base=int(base) if float(base).is_integer() else base,
            context_window_size=context_window_size,
            head_dim=self.head_dim,
            prefill_chunk_size=prefill_chunk_size,
            max_batch_size=max_batch_size,
        )


def _get(cfg: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            return cfg[key]
    return default


def arch_from_config(cfg: dict[str, Any], where: str = "config.json") -> NeoXArch:
    """Validate the architecture and normalise both rotary spellings."""
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and cfg.get("model_type") != "gpt_neox":
        raise WorkflowError(
            f"{where}: architectures {archs} (model_type {cfg.get('model_type')!r}) is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise WorkflowError(f"{where}: rope_parameters is {rope!r}; allowed: an object")
    rotary_pct = _get(cfg, "rotary_pct", "partial_rotary_factor", default=rope.get("partial_rotary_factor"))
    base = _get(cfg, "rotary_emb_base", "rope_theta", default=rope.get("rope_theta"))
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise WorkflowError(f"{where}: missing required GPT-NeoX fields {missing}")
    _check_numbers(cfg, where)
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise WorkflowError(
            f"{where}: hidden_size {cfg['hidden_size']} is not divisible by num_attention_heads "
            f"{cfg['num_attention_heads']}"
        )
    try:
        return _arch(cfg, rotary_pct, base)
    except (TypeError, ValueError, IndexError) as err:
        raise WorkflowError(f"{where}: a field has the wrong type ({err})") from None


def _arch(cfg: dict[str, Any], rotary_pct: Any, base: Any) -> NeoXArch:
    eos = cfg.get("eos_token_id", 2)
    return NeoXArch(
        hidden_size=int(cfg["hidden_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        intermediate_size=int(cfg.get("intermediate_size") or 4 * cfg["hidden_size"]),
        vocab_size=int(cfg["vocab_size"]),
        rotary_pct=float(rotary_pct if rotary_pct is not None else 0.25),
        rotary_emb_base=float(base if base is not None else 10000),
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
        use_parallel_residual=bool(cfg.get("use_parallel_residual", True)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hidden_act=str(cfg.get("hidden_act", "gelu")),
        bos_token_id=int(cfg.get("bos_token_id", 0)),
        eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
        pad_token_id=cfg.get("pad_token_id"),
    )


# Integer fields that must be at least 1, and float fields that must be finite and positive.
_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size", "max_position_embeddings")
_POSITIVE_FLOATS = ("rotary_pct", "partial_rotary_factor", "rotary_emb_base", "rope_theta", "layer_norm_eps")


def _check_numbers(cfg: dict[str, Any], where: str) -> None:
    """Refuse sizes that would build a library that fails (or lacks layers) only at run time."""
    for key in _POSITIVE_INTS:
        value = cfg.get(key)
        if value is None and key not in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise WorkflowError(f"{where}: {key} is {value!r}; allowed: an integer >= 1")
    for key in _POSITIVE_FLOATS:
        value = cfg.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise WorkflowError(f"{where}: {key} is {value!r}; allowed: a finite number > 0")
    if isinstance(cfg.get("rotary_pct"), (int, float)) and cfg["rotary_pct"] > 1:
        raise WorkflowError(f"{where}: rotary_pct is {cfg['rotary_pct']!r}; allowed: 0 < rotary_pct <= 1")


def load_arch(model_dir: str | Path) -> tuple[NeoXArch, dict[str, Any]]:
    """Read and validate ``MODEL_DIR/config.json``."""
    path = Path(model_dir) / "config.json"
    cfg = read_json(path, "model config.json")
    if not isinstance(cfg, dict):
        raise WorkflowError(f"model config.json {path} is a JSON {type(cfg).__name__}, not an object")
    return arch_from_config(cfg, str(path)), cfg


@dataclass(frozen=True)
class TensorInfo:
    """Where one source tensor lives and what it is, known without reading its data."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file (safetensors), -1 for PyTorch shards
    nbytes: int


def _weight_files(model_dir: Path) -> list[Path]:
    """Safetensors are preferred whenever present; PyTorch ``.bin`` only as a fallback."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(model_dir.glob(pattern))
        if files:
            return files
    raise WorkflowError(f"no weight files (*.safetensors or pytorch_model*.bin) in {model_dir}")


def _safetensors_index(path: Path) -> list[TensorInfo]:
    """Read and validate a safetensors header before any tensor byte is read.

    Why: the converter trusts these offsets to slice the file; a header whose byte ranges overlap,
    run past the data or disagree with shape × dtype would silently feed one tensor's bytes into
    another. Every such fault stops here with one line naming the file and the tensor.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WorkflowError(f"weight file {path} is truncated (no safetensors header)")
        (hlen,) = struct.unpack("<Q", head)
        if hlen > size - 8:
            raise WorkflowError(f"weight file {path} is truncated (header says {hlen} bytes)")
        try:
            header = json.loads(handle.read(hlen))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise WorkflowError(f"weight file {path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise WorkflowError(f"weight file {path}: safetensors header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - hlen
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end, dtype, shape = _header_entry(path, name, meta)
        if end > data_size:
            raise WorkflowError(
                f"weight file {path} is truncated: tensor {name} needs bytes up to {8 + hlen + end}, file has {size}"
            )
        out.append(TensorInfo(name, path, dtype, shape, 8 + hlen + start, end - start))
    _check_no_overlap(path, out)
    return out


def _header_entry(path: Path, name: str, meta: Any) -> tuple[int, int, str, tuple[int, ...]]:
    """One header entry as (start, end, dtype, shape), or a one-line error saying what is wrong."""
    where = f"weight file {path}: tensor {name}"
    if not isinstance(meta, dict):
        raise WorkflowError(f"{where}: header entry is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        raise WorkflowError(f"{where}: header entry lacks {', '.join(missing)}")
    st_dtype = meta["dtype"]
    if not isinstance(st_dtype, str) or st_dtype not in _ST_ITEMSIZE:
        raise WorkflowError(f"{where}: dtype {st_dtype!r} is not a safetensors dtype")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise WorkflowError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise WorkflowError(f"{where}: data_offsets {offsets!r} is not [start, end] of non-negative integers")
    start, end = offsets
    if end < start:
        raise WorkflowError(f"{where}: data_offsets [{start}, {end}] are reversed")
    need = math.prod(shape) * _ST_ITEMSIZE[st_dtype]
    if end - start != need:
        raise WorkflowError(
            f"{where}: shape {shape} of {st_dtype} needs {need} bytes, data_offsets [{start}, {end}] hold {end - start}"
        )
    dtype = _SAFETENSORS_DTYPES.get(st_dtype)
    if dtype is None:
        raise WorkflowError(f"{where} has unsupported dtype {st_dtype}; allowed: {', '.join(_SAFETENSORS_DTYPES)}")
    return start, end, dtype, tuple(shape)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: Path, infos: list[TensorInfo]) -> None:
    """Two tensors sharing bytes means at least one of them is read from the wrong place."""
    spans = sorted((i.offset, i.offset + i.nbytes, i.name) for i in infos if i.nbytes)
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            raise WorkflowError(f"weight file {path}: tensor {second} overlaps tensor {first} (byte {start} < {end})")


def _torch_index(path: Path) -> list[TensorInfo]:
    import torch  # only PyTorch checkpoints need it

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types; all mean "refused"
        raise WorkflowError(
            f"refusing to load {path}: torch.load(weights_only=True) failed ({type(err).__name__}); "
            "only plain tensor checkpoints are accepted"
        ) from None
    out = []
    for name, tensor in state.items():
        dtype = str(tensor.dtype).removeprefix("torch.")
        out.append(TensorInfo(name, path, dtype, tuple(tensor.shape), -1, tensor.numel() * tensor.element_size()))
    return out


class TensorIndex:
    """Name → :class:`TensorInfo` over every weight file of a checkpoint; reads one tensor at a time."""

    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        self.files = _weight_files(self.model_dir)
        self.tensors: dict[str, TensorInfo] = {}
        for path in self.files:
            infos = _safetensors_index(path) if path.suffix == ".safetensors" else _torch_index(path)
            for info in infos:
                if info.name in self.tensors:
                    first = self.tensors[info.name].file
                    raise WorkflowError(f"weight file {path}: tensor {info.name} is already defined in {first}")
                self.tensors[info.name] = info
        self._torch_cache: dict[Path, Any] = {}
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name: str) -> np.ndarray:
        """Read one tensor as numpy (bfloat16 widened to float32), naming file and tensor on failure."""
        info = self.tensors[name]
        if info.offset < 0:
            return self._read_torch(info)
        count = int(np.prod(info.shape)) if info.shape else 1
        raw_dtype = np.uint16 if info.dtype == "bfloat16" else np.dtype(info.dtype)
        mapped = self._map(info.file)
        if info.offset + info.nbytes > len(mapped):
            raise WorkflowError(f"weight file {info.file} is truncated at tensor {name}")
        # A read-only view of the page cache: no copy; the converter's first transform makes one.
        arr = np.frombuffer(mapped, dtype=raw_dtype, count=count, offset=info.offset).reshape(info.shape)
        if info.dtype == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr

    def release(self, names: list[str]) -> None:
        """Drop these tensors' mapped pages from this process (they stay in the page cache).

        Why: mapped file pages count towards RSS; without this a conversion's RSS would grow to the
        whole checkpoint's size although it only ever needs one tensor at a time.
        """
        page = mmap.PAGESIZE
        for name in names:
            info = self.tensors.get(name)
            if info is None or info.offset < 0 or info.file not in self._maps:
                continue
            start = info.offset // page * page
            self._maps[info.file].madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)

    def _map(self, path: Path) -> mmap.mmap:
        if path not in self._maps:
            try:
                with open(path, "rb") as handle:
                    self._maps[path] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as err:
                raise WorkflowError(f"cannot read weight file {path}: {err}") from None
        return self._maps[path]

    def _read_torch(self, info: TensorInfo) -> np.ndarray:
        import torch

        if info.file not in self._torch_cache:
            self._torch_cache = {info.file: torch.load(info.file, map_location="cpu", weights_only=True, mmap=True)}
        tensor = self._torch_cache[info.file][info.name]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy()


def itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype) or np.dtype(dtype).itemsize
