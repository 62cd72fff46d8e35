"""Sketches on disk and in memory: packed 4-bit codes, per-row tables, identities (hashes).

A sketch directory holds `sketch.safetensors` (for every sketched linear `NAME`: `NAME.codes`,
uint8 with two codes per byte, and `NAME.tables`, float16/float32 of shape out x groups x 2^bits)
and `sketch_config.json` (format, settings, the identity of the model it was fitted on, the
identity of its own contents). Both files are deterministic for a given model, seed and
calibration set; timings and errors go to a separate `fit_report.json`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import LeantuneError
from ...files import atomic_directory, load_tensors, read_format_document, save_tensors

SKETCH_FORMAT = "leantune-sketch"
SKETCH_FORMAT_VERSION = 1
SKETCH_CONFIG_FILE = "sketch_config.json"
SKETCH_TENSOR_FILE = "sketch.safetensors"
FIT_REPORT_FILE = "fit_report.json"
TABLE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
MAX_BITS = 4  # codes are stored as nibbles


# -- codes ----------------------------------------------------------------------------------

def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """out x in codes (each < 16) -> out x in/2 bytes: column 2j in the low nibble, 2j+1 in the high."""
    if codes.shape[-1] % 2:
        raise LeantuneError(f"cannot pack {codes.shape[-1]} code columns two per byte: the count must be even")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_codes`: out x in/2 bytes -> out x in codes (uint8)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def rebuild_weight(codes: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Ŵ[i, j] = tables[i, g(j), codes[i, j]] with g(j) = j // (in / groups); codes unpacked, int64."""
    out_features, groups, _ = tables.shape
    return tables.gather(2, codes.view(out_features, groups, -1)).view(out_features, -1)


# -- identities -------------------------------------------------------------------------------

def _hash_tensors(items: list[tuple[str, torch.Tensor]], digest: "hashlib._Hash") -> None:
    for name, tensor in items:
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def model_identity(model: nn.Module) -> str:
    """A hash of every tensor of the model (names, shapes, float32 values): the model a sketch fits."""
    digest = hashlib.sha256(b"leantune-model-identity-v1\n")
    items = []
    for name, tensor in model.state_dict().items():
        items.append((name, tensor.float() if tensor.is_floating_point() else tensor))
    _hash_tensors(items, digest)
    return digest.hexdigest()[:32]


# -- the sketch -------------------------------------------------------------------------------

@dataclass
class LayerSketch:
    """One sketched linear: packed codes (out x in/2, uint8) and tables (out x groups x 2^bits)."""

    packed_codes: torch.Tensor
    tables: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.tables.shape[0]

    @property
    def in_features(self) -> int:
        return 2 * self.packed_codes.shape[1]

    @property
    def groups(self) -> int:
        return self.tables.shape[1]

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return rebuild_weight(unpack_codes(self.packed_codes).long(), self.tables.to(dtype))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed_codes, self.tables))

    def to(self, device: torch.device | str) -> "LayerSketch":
        return LayerSketch(packed_codes=self.packed_codes.to(device), tables=self.tables.to(device))


@dataclass
class Sketch:
    """Every sketched linear of one model, plus what it was fitted on and with."""

    layers: dict[str, LayerSketch]
    bits: int
    groups_per_row: int
    model_name: str | None
    model_id: str
    settings: dict[str, Any] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {}
        for name in sorted(self.layers):
            tensors[f"{name}.codes"] = self.layers[name].packed_codes
            tensors[f"{name}.tables"] = self.layers[name].tables
        return tensors

    def content_id(self) -> str:
        """The identity of the sketch itself: its codes, tables, bits and group layout."""
        digest = hashlib.sha256(f"leantune-sketch-v1|bits={self.bits}|groups={self.groups_per_row}\n".encode())
        _hash_tensors(sorted(self.tensors().items()), digest)
        return digest.hexdigest()[:32]

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())

    def config_document(self) -> dict[str, Any]:
        return {
            "format": SKETCH_FORMAT,
            "format_version": SKETCH_FORMAT_VERSION,
            "bits": self.bits,
            "groups_per_row": self.groups_per_row,
            "model_name": self.model_name,
            "model_id": self.model_id,
            "sketch_id": self.content_id(),
            "settings": self.settings,
            "layers": {name: [layer.out_features, layer.in_features] for name, layer in sorted(self.layers.items())},
        }


def save_sketch(sketch: Sketch, path: str | os.PathLike, report: dict[str, Any] | None = None) -> Path:
    """Write the sketch directory atomically (an existing one is replaced only on success)."""

    with atomic_directory(path) as tmp:
        save_tensors(sketch.tensors(), tmp / SKETCH_TENSOR_FILE)
        (tmp / SKETCH_CONFIG_FILE).write_text(json.dumps(sketch.config_document(), indent=2, sort_keys=True))
        if report is not None:
            (tmp / FIT_REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True))
    return Path(path)


def read_sketch_config(path: str | os.PathLike) -> dict[str, Any]:

    document = read_format_document(path, SKETCH_CONFIG_FILE, SKETCH_FORMAT, SKETCH_FORMAT_VERSION, "sketch")
    config_path = Path(path) / SKETCH_CONFIG_FILE
    for key in ("bits", "groups_per_row", "model_id", "sketch_id", "layers"):
        if key not in document:
            raise LeantuneError(f"'{config_path}' lacks the key '{key}'")
    return document


def load_sketch(path: str | os.PathLike) -> Sketch:
    """Read and verify a sketch directory: shapes, dtypes, code range and the content hash."""

    document = read_sketch_config(path)
    tensor_path = Path(path) / SKETCH_TENSOR_FILE
    if not tensor_path.is_file():
        raise LeantuneError(f"sketch '{path}' lacks {SKETCH_TENSOR_FILE}")
    tensors = load_tensors(tensor_path)
    bits, groups = document["bits"], document["groups_per_row"]
    layers = {}
    for name, shape in document["layers"].items():
        layers[name] = _layer_from_tensors(tensors, name, shape, bits, groups, tensor_path)
    extra = sorted(set(tensors) - {f"{n}.{k}" for n in layers for k in ("codes", "tables")})
    if extra:
        raise LeantuneError(f"sketch file '{tensor_path}' holds tensor '{extra[0]}' that its config does not list")
    sketch = Sketch(layers=layers, bits=bits, groups_per_row=groups, model_name=document.get("model_name"),
                    model_id=document["model_id"], settings=document.get("settings", {}))
    if sketch.content_id() != document["sketch_id"]:
        raise LeantuneError(f"sketch '{path}' is corrupt: its tensors do not match the sketch_id in {SKETCH_CONFIG_FILE}")
    return sketch


def _layer_from_tensors(tensors: dict[str, torch.Tensor], name: str, shape: list[int], bits: int, groups: int,
                        tensor_path: Path) -> LayerSketch:
    codes, tables = tensors.get(f"{name}.codes"), tensors.get(f"{name}.tables")
    if codes is None or tables is None:
        raise LeantuneError(f"sketch file '{tensor_path}' lacks the codes or tables of '{name}'")
    out_features, in_features = shape
    if codes.dtype != torch.uint8 or tuple(codes.shape) != (out_features, in_features // 2):
        raise LeantuneError(f"sketch tensor '{name}.codes' has shape {tuple(codes.shape)} / {codes.dtype}, "
                            f"expected {(out_features, in_features // 2)} / torch.uint8")
    if tables.dtype not in TABLE_DTYPES.values() or tuple(tables.shape) != (out_features, groups, 2 ** bits):
        raise LeantuneError(f"sketch tensor '{name}.tables' has shape {tuple(tables.shape)} / {tables.dtype}, "
                            f"expected {(out_features, groups, 2 ** bits)} / float16 or float32")
    if bits < MAX_BITS and int(unpack_codes(codes).max()) >= 2 ** bits:
        raise LeantuneError(f"sketch tensor '{name}.codes' holds codes >= 2^{bits}")
    return LayerSketch(packed_codes=codes, tables=tables)
