"""Bad checkpoints and bad requests: each fails with a MoeflowError that names the problem, and the CLI
turns it into one `moeflow: error: ...` line on stderr with exit code 2 (no traceback).

Also: a sharded checkpoint (several safetensors files + index) loads back with identical weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moeflow import MoeflowError
from moeflow.checkpoint import load
from moeflow.cli import main
from moeflow.engine.llm_engine import LLMEngine
from moeflow.engine.sequence import SamplingParams
from moeflow.synthetic import PRESETS, write_checkpoint

LONG_PROMPT = "Mixture of experts models route every token to a few experts out of many, so " * 4


# -- helpers ---------------------------------------------------------------------------------------------
def cli_error(capsys, *argv: str) -> str:
    """Run `moeflow ARGV`; assert it failed as a user error; return the one `moeflow: error:` line."""
    capsys.readouterr()  # drop what earlier steps printed (e.g. transformers' save progress bar)
    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if line.startswith("moeflow: error:")]
    assert len(errors) == 1, err
    return errors[0]


def assert_single_line_stderr(capsys, path, *extra: str) -> str:
    """`moeflow generate --model PATH`: exit code 2, stdout empty, stderr exactly one `moeflow: error:` line."""
    capsys.readouterr()  # drop what earlier steps printed (e.g. transformers' save progress bar)
    rc = main(["generate", "--model", str(path), "--max-new-tokens", "2", *extra])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one stderr line, got {err!r}"
    assert err.startswith("moeflow: error: ")
    assert out == ""
    return err.strip()


def rewrite_safetensors(file: Path, edit) -> None:
    """Rewrite a safetensors file through `edit(tensors: dict) -> None` (in place on the dict)."""
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def tensor_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as f:
        return list(f.keys())


def edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.fixture
def mixtral(hf_checkpoint) -> Path:
    return hf_checkpoint("mixtral")[0]


@pytest.fixture
def sharded(hf_checkpoint, tmp_path):
    """A tiny Mixtral re-written by moeflow as several shards + model.safetensors.index.json."""
    src, _ = hf_checkpoint("mixtral")
    ck = load(src)
    out = tmp_path / "sharded"
    write_checkpoint(ck, out, shard_bytes=200_000)
    return out, ck


# -- the folder and config.json ----------------------------------------------------------------------------
def test_folder_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    with pytest.raises(MoeflowError, match=r"does not exist") as e:
        load(missing)
    assert str(missing) in str(e.value)
    line = assert_single_line_stderr(capsys, missing)
    assert "does not exist" in line and str(missing) in line


def test_folder_without_config_json(hf_checkpoint, capsys):
    path, _ = hf_checkpoint("mixtral")
    (path / "config.json").unlink()
    with pytest.raises(MoeflowError, match=r"no config\.json") as e:
        load(path)
    assert str(path) in str(e.value)
    line = assert_single_line_stderr(capsys, path)
    assert "config.json" in line


def test_config_json_not_valid_json(mixtral, capsys):
    (mixtral / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 64,')  # cut off
    with pytest.raises(MoeflowError, match=r"config\.json is not valid JSON"):
        load(mixtral)
    line = assert_single_line_stderr(capsys, mixtral)
    assert "not valid JSON" in line


@pytest.mark.parametrize("model_type", ["llama", None], ids=["llama", "absent"])
def test_unsupported_model_type_lists_supported(mixtral, capsys, model_type):
    def edit(cfg):
        if model_type is None:
            del cfg["model_type"]
        else:
            cfg["model_type"] = model_type
    edit_config(mixtral, edit)
    with pytest.raises(MoeflowError, match=r"unsupported model_type") as e:
        load(mixtral)
    msg = str(e.value)
    assert repr(model_type) in msg
    assert "mixtral" in msg and "qwen3_moe" in msg
    line = assert_single_line_stderr(capsys, mixtral)
    assert "unsupported model_type" in line and "qwen3_moe" in line


@pytest.mark.parametrize("layout", ["rope_scaling", "rope_scaling-type-key", "rope_parameters"])
def test_unsupported_rope_type(mixtral, capsys, layout):
    """YaRN in the transformers 4 layout (rope_scaling, old 'type' key) and the transformers 5 one."""
    def edit(cfg):
        theta = cfg.pop("rope_parameters", {}).get("rope_theta", 1e6)
        yarn = {"factor": 4.0, "original_max_position_embeddings": 128}
        if layout == "rope_parameters":
            cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta, **yarn}
        else:
            cfg["rope_theta"] = theta
            cfg["rope_scaling"] = {("type" if layout.endswith("type-key") else "rope_type"): "yarn", **yarn}
    edit_config(mixtral, edit)
    with pytest.raises(MoeflowError, match=r"unsupported RoPE type 'yarn'"):
        load(mixtral)
    line = assert_single_line_stderr(capsys, mixtral)
    assert "RoPE" in line and "yarn" in line


# -- tensors -------------------------------------------------------------------------------------------
MISSING = [
    ("mixtral", "model.layers.1.block_sparse_moe.experts.3.w3.weight"),  # an expert
    ("mixtral", "model.layers.2.self_attn.k_proj.weight"),              # a dense weight
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight"),         # the router
    ("qwen3_moe", "model.layers.2.mlp.experts.5.down_proj.weight"),
    ("qwen3_moe", "model.layers.1.self_attn.q_norm.weight"),
    ("qwen3_moe", "lm_head.weight"),
]


@pytest.mark.parametrize("model_type,name", MISSING, ids=[n for _, n in MISSING])
def test_missing_tensor_is_named(hf_checkpoint, model_type, name):
    path, _ = hf_checkpoint(model_type)
    file = path / "model.safetensors"
    assert name in tensor_names(file)  # the test deletes a tensor that really is published under this name
    rewrite_safetensors(file, lambda t: t.pop(name))
    with pytest.raises(MoeflowError, match=r"lacks tensor '" + re.escape(name) + "'"):
        load(path)


def test_missing_expert_and_dense_tensor_cli(mixtral, capsys):
    expert, dense = MISSING[0][1], MISSING[1][1]
    rewrite_safetensors(mixtral / "model.safetensors", lambda t: (t.pop(expert), t.pop(dense)))
    with pytest.raises(MoeflowError, match=r"lacks tensor") as e:
        load(mixtral)
    assert expert in str(e.value) or dense in str(e.value)
    line = assert_single_line_stderr(capsys, mixtral)
    assert "lacks tensor" in line and (expert in line or dense in line)


MISSHAPEN = [
    ("model.layers.0.self_attn.q_proj.weight", lambda s: (s[0], s[1] - 1)),
    ("model.embed_tokens.weight", lambda s: (s[0] + 5, s[1])),
    ("model.layers.1.block_sparse_moe.experts.2.w2.weight", lambda s: (s[0], s[1] + 1)),
    ("model.layers.2.block_sparse_moe.experts.0.w1.weight", lambda s: (s[1], s[0])),  # transposed
    ("model.norm.weight", lambda s: (s[0], 1)),                                        # wrong rank
]


@pytest.mark.parametrize("name,reshape", MISSHAPEN, ids=[n for n, _ in MISSHAPEN])
def test_misshapen_tensor_names_both_shapes(mixtral, capsys, name, reshape):
    file = mixtral / "model.safetensors"
    expected = list(load_file(str(file))[name].shape)
    found = list(reshape(tuple(expected)))
    assert found != expected

    def edit(t):
        t[name] = torch.zeros(found, dtype=t[name].dtype)
    rewrite_safetensors(file, edit)
    with pytest.raises(MoeflowError) as e:
        load(mixtral)
    msg = str(e.value)
    assert repr(name) in msg
    assert str(found) in msg, msg
    assert re.search(r"expected\D*" + re.escape(str(expected)), msg), msg
    if name == MISSHAPEN[0][0]:
        line = assert_single_line_stderr(capsys, mixtral)
        assert name in line and str(found) in line and str(expected) in line


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.v_proj.weight",
                                  "model.layers.2.block_sparse_moe.experts.4.w3.weight"])
@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_non_float_tensor_dtype(mixtral, capsys, name, dtype):
    file = mixtral / "model.safetensors"

    def edit(t):
        t[name] = torch.ones(t[name].shape, dtype=dtype)  # right shape, wrong kind of number
    rewrite_safetensors(file, edit)
    with pytest.raises(MoeflowError) as e:
        load(mixtral)
    msg = str(e.value)
    assert repr(name) in msg
    st_dtype = {torch.int8: "I8", torch.int32: "I32"}[dtype]
    assert st_dtype in msg and "bf16" in msg, msg
    if dtype is torch.int8 and "experts" in name:
        line = assert_single_line_stderr(capsys, mixtral)
        assert name in line and st_dtype in line


# -- damaged safetensors files -------------------------------------------------------------------------
def _garbage_prefix(b: bytes) -> bytes:
    return b"\xde\xad\xbe\xef" * 4 + b[16:]


def _garbage_header_json(b: bytes) -> bytes:  # a plausible length, then not JSON
    return b[:8] + b"#" * 32 + b[40:]


def _truncated(b: bytes) -> bytes:
    return b[: len(b) * 2 // 3]


def _truncated_in_header(b: bytes) -> bytes:
    return b[:20]


def _empty(b: bytes) -> bytes:
    return b""


DAMAGE = [_garbage_prefix, _garbage_header_json, _truncated, _truncated_in_header, _empty]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.strip("_") for d in DAMAGE])
def test_corrupt_safetensors_names_the_file(mixtral, capsys, damage):
    file = mixtral / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(MoeflowError, match=r"corrupt") as e:
        load(mixtral)
    assert str(file) in str(e.value)
    if damage in (_garbage_prefix, _truncated):
        line = assert_single_line_stderr(capsys, mixtral)
        assert "corrupt" in line and "model.safetensors" in line


@pytest.mark.parametrize("damage", [_garbage_prefix, _truncated], ids=["garbage_prefix", "truncated"])
def test_corrupt_shard_names_that_shard(sharded, damage):
    path, _ = sharded
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(MoeflowError, match=r"corrupt") as e:
        load(path)
    assert shard.name in str(e.value)


def test_index_names_missing_shard(sharded, capsys):
    path, _ = sharded
    weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    gone = sorted(set(weight_map.values()))[-1]
    (path / gone).unlink()
    with pytest.raises(MoeflowError, match=r"missing weights file") as e:
        load(path)
    assert gone in str(e.value)
    line = assert_single_line_stderr(capsys, path)
    assert "missing weights file" in line and gone in line


def test_index_points_at_unknown_file(sharded):
    path, _ = sharded
    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.block_sparse_moe.experts.5.w1.weight"
    index["weight_map"][name] = "model-99999-of-99999.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MoeflowError, match=r"missing weights file .*model-99999-of-99999\.safetensors"):
        load(path)


def test_no_safetensors_at_all(mixtral):
    (mixtral / "model.safetensors").unlink()
    with pytest.raises(MoeflowError, match=r"no \.safetensors"):
        load(mixtral)


# -- requests --------------------------------------------------------------------------------------------
def test_prompt_longer_than_context_engine(mixtral):
    ck = load(mixtral)
    engine = LLMEngine(ck, max_seqs=1, max_len=16)
    n = len(ck.tokenizer.encode(LONG_PROMPT))
    assert n > 16
    with pytest.raises(MoeflowError, match=rf"prompt has {n} tokens; the context holds 16"):
        engine.add_request(LONG_PROMPT)
    # at the boundary: 16 tokens do not fit a context of 16, 15 do (and leave room for one new token)
    with pytest.raises(MoeflowError, match=r"prompt has 16 tokens"):
        engine.add_request(list(range(3, 19)))
    assert not engine.has_unfinished  # the refused requests were not queued
    (seq,) = engine.generate([list(range(3, 18))], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(seq.output_ids) == 1 and seq.finish_reason == "length"


def test_prompt_longer_than_context_cli(mixtral, capsys):
    line = assert_single_line_stderr(capsys, mixtral, "--prompt", LONG_PROMPT, "--max-len", "16")
    assert "prompt has" in line and "context holds 16" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_device_cuda_without_gpu(mixtral, capsys):
    with pytest.raises(MoeflowError, match=r"no CUDA GPU"):
        load(mixtral, device="cuda")
    with pytest.raises(MoeflowError, match=r"no CUDA GPU"):
        load(mixtral, device="cpu", expert_device="cuda")
    line = assert_single_line_stderr(capsys, mixtral, "--device", "cuda")
    assert "cuda" in line and "GPU" in line


def test_unknown_synthetic_name_lists_presets(capsys):
    with pytest.raises(MoeflowError, match=r"unknown synthetic model 'nope'") as e:
        load("synthetic:nope")
    for name in PRESETS:
        assert name in str(e.value)
    line = cli_error(capsys, "generate", "--model", "synthetic:nope", "--max-new-tokens", "2")
    assert "'nope'" in line and all(name in line for name in PRESETS)
    line = cli_error(capsys, "synth", "nope", "--out", "unused")
    assert "'nope'" in line and "tiny-qwen3" in line


# -- a sharded checkpoint loads back identically ---------------------------------------------------------
@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_sharded_checkpoint_round_trip(hf_checkpoint, tmp_path, model_type):
    src, _ = hf_checkpoint(model_type, **({"mlp_only_layers": [1]} if model_type == "qwen3_moe" else {}))
    ck = load(src)
    out = tmp_path / "sharded"
    shard_bytes = 150_000
    write_checkpoint(ck, out, shard_bytes=shard_bytes)

    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) >= 3 and not (out / "model.safetensors").exists()
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(weight_map.values()) == {f.name for f in shards}
    for f in shards:
        names = tensor_names(f)
        assert {n for n, s in weight_map.items() if s == f.name} == set(names)
        if len(names) > 1:  # a shard only exceeds the limit when one tensor alone does
            assert f.stat().st_size <= shard_bytes + 16_384

    back = load(out)
    assert back.store.data.dtype == ck.store.data.dtype
    assert torch.equal(back.store.data, ck.store.data)
    ours, theirs = dict(ck.model.named_parameters()), dict(back.model.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert torch.equal(theirs[name], p), name
    assert back.cfg == ck.cfg
    # and the two run the same: identical logits
    ids = list(range(5, 30))
    a = LLMEngine(ck, max_seqs=1, max_len=64).prefill_logits([ids])[0]
    b = LLMEngine(back, max_seqs=1, max_len=64).prefill_logits([ids])[0]
    assert torch.equal(a, b)


# -- inputs that once escaped as tracebacks --------------------------------------------------------------
def test_config_json_not_an_object(mixtral):
    (mixtral / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(MoeflowError, match=r"config\.json"):
        load(mixtral)


def test_index_not_valid_json(sharded):
    path, _ = sharded
    (path / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(MoeflowError, match=r"index\.json"):
        load(path)


def test_unknown_device_name(mixtral, capsys):
    assert cli_error(capsys, "generate", "--model", str(mixtral), "--device", "gpu")


def test_yarn_rope_scaling_beside_default_rope_parameters(mixtral):
    edit_config(mixtral, lambda cfg: cfg.update(
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}))
    with pytest.raises(MoeflowError, match=r"RoPE"):
        load(mixtral)


def test_expert_store_moves_between_layouts():
    """The host store keeps down transposed, a GPU store as published; moving a store keeps every matrix."""
    from moeflow.experts.store import ExpertStore
    from moeflow.synthetic import build_synthetic

    ck = build_synthetic("tiny-qwen3")
    assert ck.store.down_transposed and not ExpertStore(ck.cfg, torch.float32, "meta").down_transposed
    gpu_like = ExpertStore(ck.cfg, ck.store.data.dtype, "cpu", down_transposed=False)
    for layer in ck.store.layers:
        gpu_like.gate_up(layer).copy_(ck.store.gate_up(layer))
        gpu_like.down_t(layer).copy_(ck.store.down_t(layer))
    assert not torch.equal(gpu_like.data, ck.store.data)  # the layouts do differ
    back = gpu_like.to("cpu")
    for layer in ck.store.layers:
        for e in (0, ck.cfg.num_experts - 1):
            for part in ("gate", "up", "down"):
                assert torch.equal(back.part(layer, e, part), ck.store.part(layer, e, part))


def test_synthetic_experts_do_not_depend_on_the_store_layout():
    """The GPU keeps down as published, the host transposed: a synthetic model must be the same model on both."""
    from moeflow.experts.store import ExpertStore
    from moeflow.synthetic import RandomFiller, build_synthetic, fill_store

    ck = build_synthetic("tiny-qwen3")
    published = ExpertStore(ck.cfg, ck.store.data.dtype, "cpu", down_transposed=False)
    fill_store(RandomFiller("cpu", published.data.dtype, 1, published.data.numel()), published)
    assert not torch.equal(published.data, ck.store.data)  # the memory differs ...
    for layer in ck.store.layers:                          # ... the matrices do not
        assert torch.equal(published.gate_up(layer), ck.store.gate_up(layer))
        assert torch.equal(published.down_t(layer), ck.store.down_t(layer))
