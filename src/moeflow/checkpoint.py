"""Hugging Face checkpoint folders: config.json, (sharded) safetensors read lazily, tokenizer, generation config.

`load(spec, ...)` is the one entry point: a folder path, `builtin:NAME` for a trained model shipped inside the
package (src/moeflow/data/NAME), or `synthetic:NAME` for random weights built in memory.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moeflow import MoeflowError
from moeflow.config import ModelConfig, read_json
from moeflow.experts.store import ExpertStore
from moeflow.loaded import Checkpoint, check_fits, resolve_device, resolve_dtype  # noqa: F401  (checkpoint's API)
from moeflow.models import get_architecture
from moeflow.quant.format import QuantSpec, parse_quant
from moeflow.quant.published import PublishedQuant
from moeflow.tokenizer import TextTokenizer

PROGRESS_MIN_BYTES = 1 << 30  # show a progress bar when loading more than this
BUILTIN_DIR = Path(__file__).parent / "data"  # trained models shipped as package data, by name


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise MoeflowError(f"model folder {path} does not exist")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise MoeflowError(f"{path} has no config.json; is it a Hugging Face checkpoint folder?")
    return read_json(cfg_file)


def tensor_index(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map", {})
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MoeflowError(f"{path} holds no .safetensors weights")
    out = {}
    for f in files:
        with open_safetensors(f) as st:
            out.update({name: f for name in st.keys()})
    return out


def open_safetensors(f: Path):
    if not f.exists():
        raise MoeflowError(f"missing weights file {f} (named in model.safetensors.index.json)")
    try:
        return safe_open(str(f), framework="pt")  # memory-mapped: tensors are read when asked for
    except Exception as e:  # SafetensorError is not importable in every version
        raise MoeflowError(f"corrupt safetensors file {f}: {e}") from None


class TensorReader:
    """Reads published tensors by name across shards, checking names and shapes."""

    def __init__(self, path: Path, stack: ExitStack, published: PublishedQuant | None = None):
        self.path, self.index, self.stack, self.files = path, tensor_index(path), stack, {}
        self.published = published  # GPTQ/AWQ: a missing `X.weight` is dequantized from X.qweight and the rest

    def has(self, name: str) -> bool:
        return name in self.index

    def raw(self, name: str) -> torch.Tensor | None:
        """A tensor as stored (any dtype), or None."""
        return self._file(name).get_tensor(name) if name in self.index else None

    def _file(self, name: str):
        f = self.index[name]
        if f not in self.files:
            self.files[f] = self.stack.enter_context(open_safetensors(f))
        return self.files[f]

    def get(self, name: str, shape: tuple[int, ...], dtypes: tuple[str, ...] = ("BF16", "F16", "F32")) -> torch.Tensor:
        base = name.removesuffix(".weight")
        if name not in self.index and self.published is not None and base + ".qweight" in self.index:
            return self.published.dequantize(self.raw, base, shape)
        if name not in self.index:
            raise MoeflowError(f"checkpoint {self.path} lacks tensor {name!r}")
        sl = self._file(name).get_slice(name)
        found = tuple(sl.get_shape())
        if found != tuple(shape):
            raise MoeflowError(f"tensor {name!r} has shape {list(found)}, expected {list(shape)}")
        if sl.get_dtype() not in dtypes:
            raise MoeflowError(f"tensor {name!r} is {sl.get_dtype()}; moeflow reads bf16, fp16 and fp32")
        return self._file(name).get_tensor(name)


def read_model_config(spec: str | Path) -> tuple[str, ModelConfig]:
    """(name, ModelConfig) of a folder, builtin:NAME or synthetic:NAME from its config alone: no weights read."""
    spec = str(spec)
    if spec.startswith("synthetic:"):
        from moeflow.synthetic import PRESETS

        name = synthetic_quant(spec.removeprefix("synthetic:"))[0]
        if name not in PRESETS:
            raise MoeflowError(f"unknown synthetic model {name!r}; choose one of {', '.join(PRESETS)}")
        hf = PRESETS[name]
    else:
        hf = read_config(model_folder(spec))
    return spec, get_architecture(hf.get("model_type")).config(hf)


def model_folder(spec: str) -> Path:
    """The folder of a checkpoint spec: builtin:NAME, or a path."""
    return builtin_path(spec.removeprefix("builtin:")) if spec.startswith("builtin:") else Path(spec).expanduser()


def folder_quant(path: Path, hf: dict, quant: QuantSpec | None) -> tuple[PublishedQuant | None, QuantSpec | None]:
    """A folder's published quantization (GPTQ / AWQ, read from its config) and the experts' as stored: `quant`
    (--quantize) where given, else the published one requantized into moeflow's format."""
    published = PublishedQuant.read(path, hf)
    return published, quant or (published.spec() if published else None)


def synthetic_quant(name: str, quant: QuantSpec | str | None = None) -> tuple[str, QuantSpec | None]:
    """A synthetic preset's name and quantization: `mixtral-8x7b-int4` is mixtral-8x7b with int4 experts."""
    quant = parse_quant(quant) if isinstance(quant, str) or quant is None else quant
    for suffix in ("-int4", "-int8"):
        if name.endswith(suffix) and quant is None:
            return name.removesuffix(suffix), parse_quant(suffix[1:])
    return name, quant


def model_quant(spec: str | Path, quant: QuantSpec | str | None = None) -> QuantSpec | None:
    """The experts' quantization of a model spec, as load() will store them: `quant` (--quantize), a synthetic
    preset's -int4/-int8, or a GPTQ/AWQ folder's own (its quantization_config)."""
    if str(spec).startswith("synthetic:"):
        return synthetic_quant(str(spec).removeprefix("synthetic:"), quant)[1]
    quant = parse_quant(quant) if isinstance(quant, str) or quant is None else quant
    path = model_folder(str(spec))
    if quant is None and (path / "config.json").is_file():
        return folder_quant(path, read_config(path), quant)[1]
    return quant


def load(spec: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         expert_device: str | torch.device | None = None, progress: bool | None = None,
         quant: QuantSpec | str | None = None, owned: torch.Tensor | None = None) -> Checkpoint:
    """Load a model: non-expert weights on `device`, the expert store on `expert_device` (default: same);
    quant (`--quantize`): the experts quantized at load (quant/format.py); owned [MoE layers, E] (a rank of
    --gpus, dist/ep.py): only those experts are kept in host memory (a checkpoint folder; synthetic: all)."""
    from moeflow.experts.local import LocalExperts

    spec = str(spec)
    if spec.startswith("synthetic:"):
        from moeflow.synthetic import build_synthetic
        name, quant = synthetic_quant(spec.removeprefix("synthetic:"), quant)
        return build_synthetic(name, device, dtype, expert_device, quant=quant)
    quant = parse_quant(quant) if isinstance(quant, str) or quant is None else quant
    path = model_folder(spec)
    hf = read_config(path)
    arch = get_architecture(hf.get("model_type"))
    cfg = arch.config(hf)
    published, quant = folder_quant(path, hf, quant)  # GPTQ / AWQ: experts requantized into moeflow's format
    device = resolve_device(device)
    expert_device = resolve_device(expert_device or device)
    dtype = resolve_dtype(dtype, cfg, device)
    check_fits(path.name, arch, cfg, dtype, device, expert_device, quant)
    tokenizer = TextTokenizer.from_dir(path)
    if owned is None:
        store = ExpertStore(cfg, dtype, expert_device, quant=quant)
    else:
        from moeflow.dist.ep import OwnedStore
        store = OwnedStore(cfg, dtype, expert_device, quant=quant, owned=owned)
    with torch.device("meta"):
        model = arch.build(cfg, LocalExperts(store))
    with ExitStack() as stack:
        reader = TensorReader(path, stack, published)
        params = dict(model.named_parameters())  # tied weights appear once
        total = sum(p.numel() for p in params.values()) * dtype.itemsize + store.nbytes
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}",
                   disable=not progress if progress is not None else total < PROGRESS_MIN_BYTES)
        state = {}
        for name, p in params.items():
            state[name] = reader.get(arch.hf_name(name), tuple(p.shape)).to(device, dtype)
            bar.update(p.numel() * dtype.itemsize)
        model.load_state_dict(state, strict=False, assign=True)  # every parameter is in `state`
        model.tie_weights()
        arch.load_experts(reader, store, bar.update)
        bar.close()
    gen_file = path / "generation_config.json"
    generation = read_json(gen_file) if gen_file.exists() else {}
    name = spec if spec.startswith("builtin:") else path.name
    return Checkpoint(name, arch, cfg, model.eval(), store, tokenizer, generation)


def builtin_path(name: str) -> Path:
    path = BUILTIN_DIR / name
    if not (path / "config.json").exists():
        shipped = sorted(p.parent.name for p in BUILTIN_DIR.glob("*/config.json")) if BUILTIN_DIR.is_dir() else []
        raise MoeflowError(f"no built-in model {name!r} in this install (looked in {path}); "
                           f"shipped: {', '.join(shipped) or 'none'}")
    return path
