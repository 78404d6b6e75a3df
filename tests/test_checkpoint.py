"""Checkpoint I/O (engine.checkpoint): both Hugging Face layouts, sharded indexes, per-expert expert
tensors, one error listing every problem, FP8 loading, bit-identical load -> save -> load, FP8
conversion, and no pickle ever read. Legend: E experts, D width, F expert hidden width.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tolerances import (
    FP8_GEMM_MAX_DIFF,
    MODEL_PARITY_RTOL,
    MODEL_SELF_RTOL,
    assert_relative_close,
    calc_diff,
    fp8_rounding_bound,
)

import engine
from engine import ops
from engine.checkpoint import CheckpointError, convert, from_pretrained, save_pretrained
from engine.model.layers import FP8ExpertsMoE

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _tiny_hf(path: Path, *, scout_like: bool, seed: int = 0) -> None:
    config = transformers.Llama4TextConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
        intermediate_size=16,
        intermediate_size_mlp=48,
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1 if scout_like else 2,
        use_qk_norm=scout_like,
        attention_chunk_size=8,
        floor_scale=4,
        max_position_embeddings=128,
        pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    hf = transformers.Llama4ForCausalLM(config).float()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A Maverick-like (dense and MoE layers) Llama4ForCausalLM checkpoint saved by transformers."""
    path = tmp_path_factory.mktemp("hf_causal")
    _tiny_hf(path, scout_like=False)
    return path


def _state(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _write(path: Path, tensors: dict, config: dict, *, shards: int = 1) -> None:
    """A checkpoint folder: config.json and `shards` safetensors files (+ index when sharded)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k].contiguous() for k in keys}, path / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k].contiguous() for k in part}, path / name)
        weight_map.update(dict.fromkeys(part, name))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def _assert_same_model(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k].view(torch.uint8), sb[k].view(torch.uint8)), k  # bitwise (FP8 included)


def _per_expert(tensors: dict) -> dict:
    """Fused experts -> experts.{e}.{gate,up,down}_proj.weight ([out, in] per expert)."""
    out = {}
    for k, t in tensors.items():
        if k.endswith("experts.gate_up_proj"):
            F = t.shape[2] // 2
            for e in range(t.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = t[e, :, :F].t().contiguous()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = t[e, :, F:].t().contiguous()
        elif k.endswith("experts.down_proj"):
            for e in range(t.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = t[e].t().contiguous()
        else:
            out[k] = t
    return out


def test_causal_lm_layout_loads_every_weight(hf_dir):
    model = from_pretrained(hf_dir, dtype=torch.float32)
    hf = _state(hf_dir)
    assert not model.training
    assert torch.equal(model.embed_tokens.weight, hf["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.weight, hf["lm_head.weight"])
    assert torch.equal(model.layers[0].feed_forward.up_proj.weight, hf["model.layers.0.feed_forward.up_proj.weight"])
    moe = model.layers[1].feed_forward
    assert torch.equal(moe.gate_up_ENK, hf["model.layers.1.feed_forward.experts.gate_up_proj"].transpose(1, 2))
    assert torch.equal(moe.down_EDF, hf["model.layers.1.feed_forward.experts.down_proj"].transpose(1, 2))
    assert torch.equal(moe.router.weight, hf["model.layers.1.feed_forward.router.weight"])
    assert torch.equal(moe.expert_bias, torch.zeros(4))
    half = from_pretrained(hf_dir, dtype=torch.bfloat16)
    assert half.layers[1].feed_forward.gate_up_ENK.dtype == torch.bfloat16
    assert torch.equal(half.norm.weight, hf["model.norm.weight"].bfloat16())


def test_conditional_generation_layout_skips_vision_with_a_note(hf_dir, tmp_path, caplog):
    text = _state(hf_dir)
    tensors = {("language_model." + k): t for k, t in text.items()}
    tensors["vision_model.patch_embedding.linear.weight"] = torch.randn(8, 12)
    tensors["multi_modal_projector.linear_1.weight"] = torch.randn(32, 8)
    config = {"architectures": ["Llama4ForConditionalGeneration"], "text_config": _config(hf_dir), "vision_config": {}}
    _write(tmp_path / "cg", tensors, config, shards=3)
    with caplog.at_level("INFO", logger="engine.checkpoint"):
        model = from_pretrained(tmp_path / "cg", dtype=torch.float32)
    assert "2 vision / projector tensors skipped" in caplog.text
    _assert_same_model(model, from_pretrained(hf_dir, dtype=torch.float32))


def test_sharded_index_loads_the_same_model(hf_dir, tmp_path):
    _write(tmp_path / "sharded", _state(hf_dir), _config(hf_dir), shards=4)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    _assert_same_model(
        from_pretrained(tmp_path / "sharded", dtype=torch.float32), from_pretrained(hf_dir, dtype=torch.float32)
    )


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_per_expert_layout_equals_fused(hf_dir, tmp_path, precision):
    _write(tmp_path / "pe", _per_expert(_state(hf_dir)), _config(hf_dir), shards=3)
    a = from_pretrained(tmp_path / "pe", dtype=torch.float32, precision=precision)
    b = from_pretrained(hf_dir, dtype=torch.float32, precision=precision)
    _assert_same_model(a, b)


def test_every_problem_listed_in_one_error(hf_dir, tmp_path):
    tensors = _state(hf_dir)
    del tensors["model.layers.2.self_attn.k_proj.weight"]  # missing
    tensors["model.layers.9.self_attn.q_proj.weight"] = torch.zeros(4)  # unexpected
    tensors["model.norm.weight"] = torch.ones(31)  # wrong shape
    tensors["model.layers.0.input_layernorm.weight"] = torch.ones(32, dtype=torch.int32)  # wrong dtype
    del tensors["model.layers.3.feed_forward.experts.down_proj"]  # a whole expert tensor missing
    per_expert = _per_expert({k: v for k, v in tensors.items() if "layers.1.feed_forward.experts" in k})
    tensors = {k: v for k, v in tensors.items() if "layers.1.feed_forward.experts" not in k}
    del per_expert["model.layers.1.feed_forward.experts.2.up_proj.weight"]  # one expert's piece missing
    tensors.update(per_expert)
    _write(tmp_path / "bad", tensors, _config(hf_dir))
    with pytest.raises(CheckpointError) as info:
        from_pretrained(tmp_path / "bad", dtype=torch.float32)
    msg = str(info.value)
    assert "nothing was loaded" in msg
    for expected in (
        "missing (3)",
        "model.layers.2.self_attn.k_proj.weight",
        "model.layers.3.feed_forward.experts.down_proj",
        "model.layers.1.feed_forward.experts.2.up_proj.weight",
        "unexpected (1)",
        "model.layers.9.self_attn.q_proj.weight",
        "shape mismatch (1)",
        "model.norm.weight: checkpoint [31], model expects [32]",
        "dtype mismatch (1)",
        "model.layers.0.input_layernorm.weight: checkpoint I32",
    ):
        assert expected in msg, (expected, msg)


def test_a_tensor_given_twice_is_an_error(hf_dir, tmp_path):
    tensors = _state(hf_dir)
    tensors.update({k: v for k, v in _per_expert(tensors).items() if ".experts.0.gate_proj" in k})
    _write(tmp_path / "twice", tensors, _config(hf_dir))
    with pytest.raises(CheckpointError, match="given twice"):
        from_pretrained(tmp_path / "twice", dtype=torch.float32)


def test_fp8_load_quantises_experts_per_expert_and_channel(hf_dir, gen):
    ref = from_pretrained(hf_dir, dtype=torch.float32)
    model = from_pretrained(hf_dir, dtype=torch.float32, precision="fp8")
    assert model.precision == "fp8"
    for layer_ref, layer in zip(ref.layers, model.layers, strict=True):
        if not layer.is_moe:
            continue
        moe, moe_ref = layer.feed_forward, layer_ref.feed_forward
        assert isinstance(moe, FP8ExpertsMoE)
        for w_ref, w, s in (
            (moe_ref.gate_up_ENK, moe.gate_up_ENK, moe.gate_up_scale_EN),
            (moe_ref.down_EDF, moe.down_EDF, moe.down_scale_EN),
        ):
            assert w.dtype == torch.float8_e4m3fn and s.shape == w.shape[:2]
            E, N, K = w_ref.shape
            codes, scale = ops.quantize_fp8(w_ref.detach().reshape(E * N, K), granularity="row")
            assert torch.equal(w.view(torch.uint8), codes.view(E, N, K).view(torch.uint8))
            assert torch.equal(s, scale.view(E, N))
            dequant = w.float() * s[:, :, None]
            bound = fp8_rounding_bound(w_ref.detach(), s[:, :, None], torch.float8_e4m3fn)
            assert ((dequant - w_ref.detach()).abs() <= bound).all()
        assert torch.equal(moe.router.weight, moe_ref.router.weight)
        assert moe.shared_expert.gate_proj.weight.dtype == torch.float32
    ids = torch.randint(1, VOCAB, (2, 11), generator=gen)
    with torch.no_grad():
        assert calc_diff(model(ids), ref(ids)) < FP8_GEMM_MAX_DIFF  # measured ~8e-6; a wrong scale or layout: ~1
    assert model.num_params() == ref.num_params()
    # The FP8 experts are frozen; activations (hence the embedding, router, shared expert) still learn.
    model(ids).square().mean().backward()
    assert model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.layers[1].feed_forward.router.weight.grad.abs().sum() > 0
    ref(ids).square().mean().backward()
    # The dgrad through the FP8 experts, seen at the model's input (measured calc_diff ~1e-5).
    assert calc_diff(model.embed_tokens.weight.grad, ref.embed_tokens.weight.grad) < FP8_GEMM_MAX_DIFF


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_load_save_load_is_bit_identical(hf_dir, tmp_path, precision):
    a = from_pretrained(hf_dir, dtype=torch.bfloat16, precision=precision)
    a.layers[1].feed_forward.expert_bias.copy_(torch.tensor([0.5, -0.25, 0.0, -0.25]))  # trained balancing state
    engine.save_pretrained(a, tmp_path / "out", max_shard_bytes=20_000)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(files) > 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == files
    b = engine.from_pretrained(tmp_path / "out", dtype=torch.bfloat16, precision=precision)
    _assert_same_model(a, b)
    save_pretrained(b, tmp_path / "again", max_shard_bytes=20_000)
    for f in files:
        assert (tmp_path / "out" / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_saved_checkpoint_loads_in_transformers(hf_dir, tmp_path, gen):
    ours = from_pretrained(hf_dir, dtype=torch.float32)
    save_pretrained(ours, tmp_path / "out")
    hf = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").float().eval()
    ids = torch.randint(1, VOCAB, (1, 13), generator=gen)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert_relative_close(got, expected, MODEL_PARITY_RTOL, "logits")


def test_convert_writes_an_fp8_checkpoint(hf_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(hf_dir, src)
    (src / "tokenizer.json").write_text("{}")
    convert(src, tmp_path / "fp8")
    config = _config(tmp_path / "fp8")
    assert config["quantization_config"]["quant_method"] == "fbgemm_fp8"
    assert (tmp_path / "fp8" / "tokenizer.json").read_text() == "{}"
    with safe_open(next((tmp_path / "fp8").glob("*.safetensors")), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.feed_forward.experts.gate_up_proj_scale" in keys
    tensors = _state(tmp_path / "fp8")
    assert tensors["model.layers.1.feed_forward.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.feed_forward.experts.gate_up_proj_scale"].shape == (4, 1, 32)
    assert tensors["model.layers.1.feed_forward.experts.down_proj_scale"].shape == (4, 32, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    loaded = from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, precision="fp8")
    _assert_same_model(loaded, from_pretrained(hf_dir, dtype=torch.bfloat16, precision="fp8"))
    with pytest.raises(CheckpointError, match="precision='fp8'"):
        from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)


class _Boom:
    """Unpickling this runs code (writes a marker file): what a pickle checkpoint can do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pickle was read"))


def test_no_pickle_is_ever_read(hf_dir, tmp_path):
    marker = tmp_path / "marker"
    only_pickle = tmp_path / "only_pickle"
    only_pickle.mkdir()
    shutil.copy(hf_dir / "config.json", only_pickle / "config.json")
    (only_pickle / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(CheckpointError, match="only safetensors"):
        from_pretrained(only_pickle)
    both = tmp_path / "both"
    shutil.copytree(hf_dir, both)
    shutil.copy(only_pickle / "pytorch_model.bin", both / "pytorch_model.bin")
    from_pretrained(both, dtype=torch.float32)
    assert not marker.exists()


def test_precision_and_missing_config_errors(hf_dir, tmp_path):
    with pytest.raises(ValueError, match="precision"):
        from_pretrained(hf_dir, precision="int8")
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        from_pretrained(tmp_path)


@pytest.mark.gpu
def test_fp8_load_on_cuda_matches_the_cpu_reference(hf_dir, gen):
    """FP8 experts quantised on the GPU while loading: the same codes as on the CPU, logits close."""
    cpu = from_pretrained(hf_dir, dtype=torch.float32, precision="fp8")
    gpu = from_pretrained(hf_dir, dtype=torch.bfloat16, device="cuda", precision="fp8")
    for a, b in zip(cpu.moe_layers(), gpu.moe_layers(), strict=True):
        assert torch.equal(a.gate_up_ENK.view(torch.uint8), b.gate_up_ENK.cpu().view(torch.uint8))
        assert torch.equal(a.down_scale_EN, b.down_scale_EN.cpu())
    ids = torch.randint(1, VOCAB, (2, 11), generator=gen)
    with torch.no_grad():
        assert calc_diff(gpu(ids.cuda()).float().cpu(), cpu(ids)) < FP8_GEMM_MAX_DIFF


def test_lora_experts_are_merged_on_save(hf_dir, tmp_path, gen):
    from engine.moe import MoE

    model = from_pretrained(hf_dir, dtype=torch.float32)
    base = model.layers[1].feed_forward
    lora = MoE(base.d_model, base.d_ff, base.n_experts, base.top_k, lora_rank=2, lora_alpha=4.0, dtype=torch.float32)
    lora.load_state_dict(base.state_dict(), strict=False)
    with torch.no_grad():
        lora.lora_b_gate_up_ENR.normal_(0, 0.3, generator=gen)
        lora.lora_b_down_EDR.normal_(0, 0.3, generator=gen)
    model.layers[1].feed_forward = lora
    save_pretrained(model, tmp_path / "merged")
    merged = from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.layers[1].feed_forward.lora_rank == 0
    ids = torch.randint(1, VOCAB, (2, 9), generator=gen)
    with torch.no_grad():
        assert_relative_close(merged(ids), model(ids), MODEL_SELF_RTOL, "merged logits")
