"""Hugging Face checkpoint directories: load into a :class:`Transformer`, save one back, atomically.

Format: ``config.json`` + ``model.safetensors`` or ``model.safetensors.index.json`` with shards. Tensor
names are DeepSeek's: ``model.layers.{i}.self_attn.*``, per-expert ``model.layers.{i}.mlp.experts.{e}.
{gate,up,down}_proj.weight`` (the fused ``experts.gate_up_proj`` / ``experts.down_proj`` are read too), the
MTP modules as layer ``num_hidden_layers + k``, FP8 e4m3 weights with ``weight_scale_inv`` per block.
Only safetensors is read: no pickle.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import tempfile
import warnings
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .. import ops
from ..config import ModelConfig
from .transformer import Transformer

PathLike = Union[str, os.PathLike]
_BLOCK_PARTS = ("self_attn.", "mlp.", "input_layernorm.", "post_attention_layernorm.")
# Tensors of an MTP layer that duplicate the main model's (its embedding and output head).
_MTP_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
_ST_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn,
    "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "I16": torch.int16, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
    """A checkpoint does not match the model its config describes; the message lists every tensor involved."""


# ---------------------------------------------------------------------------------------------- mapping
@dataclasses.dataclass
class _Source:
    """Where (part of) one model tensor comes from: checkpoint key, target slice along dim 0 and dim 1."""

    key: str
    rows: Optional[slice] = None
    index: Optional[int] = None  # first-dim index into a stacked [E, ...] tensor


def _sources(cfg: ModelConfig, name: str, shape: tuple, ckpt_keys: set) -> list[_Source]:
    """Checkpoint keys that fill the model tensor ``name`` (Transformer naming)."""
    m = re.match(r"mtp\.(\d+)\.(.*)$", name)
    if m:
        k, rest = int(m.group(1)), m.group(2)
        prefix = f"model.layers.{cfg.num_hidden_layers + k}."
        rest = rest[len("block."):] if rest.startswith("block.") else rest
    elif name == "lm_head.weight":
        return [_Source("lm_head.weight")]
    else:
        prefix, rest = "model.", name
    m = re.match(r"(.*mlp\.experts\.)(w13|w2)$", rest)
    if m is None:
        return [_Source(prefix + rest)]
    base, which = prefix + m.group(1), m.group(2)
    fused = base + ("gate_up_proj" if which == "w13" else "down_proj")
    if fused in ckpt_keys:
        return [_Source(fused)]
    n_exp = shape[0]
    if which == "w2":
        return [_Source(f"{base}{e}.down_proj.weight", index=e) for e in range(n_exp)]
    inter = shape[1] // 2
    out = []
    for e in range(n_exp):
        out.append(_Source(f"{base}{e}.gate_proj.weight", index=e, rows=slice(0, inter)))
        out.append(_Source(f"{base}{e}.up_proj.weight", index=e, rows=slice(inter, 2 * inter)))
    return out


def _target_shape(shape: tuple, src: _Source) -> tuple:
    if src.index is None:
        return tuple(shape)
    sub = tuple(shape[1:])
    if src.rows is not None:
        sub = (src.rows.stop - src.rows.start,) + sub[1:]
    return sub


def _model_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers, by name."""
    yield from model.named_parameters()
    non_persistent = {f"{mn}.{b}" if mn else b for mn, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    for name, buf in model.named_buffers():
        if buf is not None and name not in non_persistent:
            yield name, buf


# ---------------------------------------------------------------------------------------------- reading
class _Files:
    """The safetensors files of a checkpoint directory, opened lazily, tensors read one at a time."""

    def __init__(self, path: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self.key_file = {k: os.path.join(path, v) for k, v in weight_map.items()}
        elif os.path.exists(single):
            self.key_file = None
            self._single = single
        else:
            pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
            extra = f" (found {', '.join(pickles)}: pickle checkpoints are not read, convert them to safetensors)" if pickles else ""
            raise FileNotFoundError(f"load_pretrained: {path} holds neither model.safetensors nor model.safetensors.index.json{extra}")
        self._open: dict[str, object] = {}
        if self.key_file is None:
            self.key_file = {k: self._single for k in self._handle(self._single).keys()}
        else:
            for file in sorted(set(self.key_file.values())):
                present = set(self._handle(file).keys())
                listed = {k for k, v in self.key_file.items() if v == file}
                if listed - present:
                    raise CheckpointError(f"load_pretrained: the index lists tensors that {os.path.basename(file)} "
                                          f"does not hold: {sorted(listed - present)}")

    def _handle(self, file: str):
        if file not in self._open:
            try:
                self._open[file] = self._safe_open(file, framework="pt", device="cpu")
            except Exception as exc:
                raise CheckpointError(f"load_pretrained: {file} is corrupted or not a safetensors file ({exc})") from exc
        return self._open[file]

    def keys(self) -> set:
        return set(self.key_file)

    def shape(self, key: str) -> tuple:
        return tuple(self._handle(self.key_file[key]).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle(self.key_file[key]).get_slice(key).get_dtype()

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle(self.key_file[key]).get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"load_pretrained: cannot read tensor {key} from "
                                  f"{os.path.basename(self.key_file[key])} ({exc})") from exc


def _mtp_layers_present(cfg: ModelConfig, keys: set) -> int:
    n = 0
    while n < cfg.num_nextn_predict_layers and any(k.startswith(f"model.layers.{cfg.num_hidden_layers + n}.") for k in keys):
        n += 1
    return n


def load_pretrained(path: PathLike, dtype: Optional[torch.dtype] = None,
                    device: Union[str, torch.device] = "cpu") -> Transformer:
    """Load a Hugging Face DeepSeek-V2 / V3 / R1 directory into a :class:`Transformer`.

    Args:
        path: directory with ``config.json`` and safetensors weights (single file or sharded with an index).
        dtype: parameter dtype; default the config's ``torch_dtype``. The router (``gate.weight``) and
            ``e_score_correction_bias`` stay fp32. FP8 e4m3 weights are dequantised with their
            ``weight_scale_inv`` blocks (``ops.fp8_block_dequant``) into ``dtype``.
        device: where the parameters live.
    The model is built on the meta device and each parameter is allocated once on ``device`` and filled
    tensor by tensor, so the weights never exist twice in memory. All names and shapes are checked before
    any data is read; every missing, unexpected or misshaped tensor is listed in one :class:`CheckpointError`.
    When the config asks for MTP modules the checkpoint does not hold (as in every checkpoint transformers
    saves), the model is loaded without them and a warning says so.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_pretrained: {path} is not a directory")
    cfg = ModelConfig.from_hf(path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        raw_cfg = json.load(f)
    block = int((raw_cfg.get("quantization_config") or {}).get("weight_block_size", [128, 128])[0])
    files = _Files(path)
    ckpt_keys = files.keys()
    n_mtp = _mtp_layers_present(cfg, ckpt_keys)
    if n_mtp < cfg.num_nextn_predict_layers:
        warnings.warn(f"load_pretrained: the config asks for {cfg.num_nextn_predict_layers} MTP module(s) but {path} "
                      f"holds {n_mtp}; the model is loaded with {n_mtp}", stacklevel=2)
        cfg = dataclasses.replace(cfg, num_nextn_predict_layers=n_mtp)
    if dtype is None:
        dtype = getattr(torch, cfg.dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype.itemsize < 2:
            dtype = torch.bfloat16
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to(dtype)
    for mod in model.modules():  # the router stays fp32, as DeepSeek and transformers keep it
        if type(mod).__name__ == "Gate":
            mod.float()

    # 1. plan and check every name and shape before reading data
    plan: list[tuple[str, torch.Tensor, _Source]] = []
    missing, misshaped, consumed = [], [], set()
    for name, t in _model_tensors(model):
        for src in _sources(cfg, name, tuple(t.shape), ckpt_keys):
            if src.key not in ckpt_keys:
                missing.append(src.key)
                continue
            consumed.add(src.key)
            want = _target_shape(tuple(t.shape), src)
            got = files.shape(src.key)
            if got != want:
                misshaped.append(f"{src.key}: checkpoint {list(got)}, model expects {list(want)}")
                continue
            if src.key + "_scale_inv" in ckpt_keys:
                consumed.add(src.key + "_scale_inv")
            plan.append((name, t, src))
    ignorable = {f"model.layers.{cfg.num_hidden_layers + k}.{s}" for k in range(n_mtp) for s in _MTP_SHARED}
    if cfg.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    unexpected = sorted(k for k in ckpt_keys - consumed - ignorable if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {title}:\n  " + "\n  ".join(items))
        raise CheckpointError(f"load_pretrained: {path} does not match its config:\n" + "\n".join(parts))

    # 2. allocate once on the device and fill tensor by tensor
    model.to_empty(device=device)
    targets = dict(_model_tensors(model))
    with torch.no_grad():
        for name, _, src in plan:
            dst = targets[name]
            if src.index is not None:
                dst = dst[src.index]
            if src.rows is not None:
                dst = dst[src.rows]
            dst.copy_(_read(files, src.key, ckpt_keys, dst.dtype, block).to(device))
    model.reset_derived_buffers()
    return model.eval()


def _read(files: _Files, key: str, keys: set, dtype: torch.dtype, block: int) -> torch.Tensor:
    t = files.get(key)
    scale_key = key + "_scale_inv"
    if scale_key in keys:
        if t.dim() != 2:
            raise CheckpointError(f"load_pretrained: {key} has a block scale but is not 2-D (shape {list(t.shape)})")
        return ops.fp8_block_dequant(t, files.get(scale_key).float(), block, dtype if dtype.is_floating_point else torch.float32)
    return t.to(dtype)


# ---------------------------------------------------------------------------------------------- writing
def _checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint key, tensor view) in DeepSeek naming; expert slices are views, not copies."""
    cfg = model.config
    for name, t in _model_tensors(model):
        m = re.match(r"mtp\.(\d+)\.(.*)$", name)
        if m:
            rest = m.group(2)
            rest = rest[len("block."):] if rest.startswith("block.") else rest
            key = f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{rest}"
        elif name == "lm_head.weight":
            key = name
        else:
            key = "model." + name
        em = re.match(r"(.*mlp\.experts\.)(w13|w2)$", key)
        if em is None:
            yield key, t
            continue
        base = em.group(1)
        for e in range(t.shape[0]):
            if em.group(2) == "w2":
                yield f"{base}{e}.down_proj.weight", t[e]
            else:
                inter = t.shape[1] // 2
                yield f"{base}{e}.gate_proj.weight", t[e, :inter]
                yield f"{base}{e}.up_proj.weight", t[e, inter:]


def _write_safetensors(file: str, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Stream tensors into one safetensors file (8-byte header length, JSON header, raw little-endian data).

    Written by hand rather than with ``safetensors.torch.save_file`` because that needs every tensor at
    once as a separate storage, which would copy the stacked experts.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, t in tensors:
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for _, t in tensors:
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def _exchange_dirs(a: str, b: str) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_pretrained(model: Transformer, path: PathLike, *, max_shard_bytes: Optional[int] = None,
                    _before_commit: Optional[Callable[[str], None]] = None) -> None:
    """Write ``model`` as a Hugging Face directory (``config.json`` + safetensors, DeepSeek naming), atomically.

    Everything is written and fsynced into a temporary sibling directory first; it then replaces ``path`` in
    one atomic exchange (Linux ``renameat2``; elsewhere two renames, where a crash between them leaves the
    previous checkpoint complete at ``path + ".old"``). An interrupted save never leaves ``path`` half-written.
    ``max_shard_bytes`` splits the weights into shards with an index. ``_before_commit`` is a test hook
    called with the temporary directory just before the exchange.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        tensors = list(_checkpoint_tensors(model))
        shards: list[list[tuple[str, torch.Tensor]]] = [[]]
        size = 0
        for key, t in tensors:
            n = t.numel() * t.element_size()
            if max_shard_bytes is not None and shards[-1] and size + n > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((key, t))
            size += n
        if len(shards) == 1:
            _write_safetensors(os.path.join(tmp, "model.safetensors"), shards[0])
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(os.path.join(tmp, fname), shard)
                weight_map.update({k: fname for k, _ in shard})
            total = sum(t.numel() * t.element_size() for _, t in tensors)
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        cfg = model.config.to_hf_dict()
        cfg["torch_dtype"] = str(model.embed_tokens.weight.dtype).replace("torch.", "")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if _before_commit is not None:
            _before_commit(tmp)
        if not os.path.exists(path):
            os.rename(tmp, path)
        elif _exchange_dirs(tmp, path):
            shutil.rmtree(tmp)  # tmp now holds the previous checkpoint
        else:
            old = path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

