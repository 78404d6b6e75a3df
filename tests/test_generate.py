"""Generation (engine.generate) and tokenizers (engine.tokenizer): greedy decoding through the KV cache
equals greedy argmax over full re-forwards without a cache, stop tokens, top-p and temperature sampling,
byte-level and tokenizer.json tokenizers. Legend: B batch, S prompt length, V vocabulary.
"""

from __future__ import annotations

import pytest
import torch

from engine.generate import generate, sample_next, top_p_filter
from engine.model import Llama4Config, Llama4ForCausalLM
from engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer
from tests.tolerances import greedy_tie_tol

CUDA_HEAD_DIM = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: debug-size models, one thread


def _model(preset: str, device, **overrides) -> Llama4ForCausalLM:
    torch.manual_seed(0)
    cuda = torch.device(device).type == "cuda"
    if cuda:  # the CUDA attention kernels take head_dim 64 or 128
        overrides = {"head_dim": CUDA_HEAD_DIM, **overrides}
    config = Llama4Config.preset(preset, **overrides)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = Llama4ForCausalLM(config, dtype=dtype, device=device).eval()
    with torch.no_grad():  # larger weights than the default init: sharper logits, fewer near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 2.0 * p.shape[-1] ** -0.5)
    return model


@torch.no_grad()
def _greedy_without_cache(model, ids_BS: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        logits_BSV = model(ids_BS)
        ids_BS = torch.cat([ids_BS, logits_BSV[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids_BS


# Debug presets: chunk 16 on RoPE layers, so 9 + 24 positions cross two chunk boundaries; a NoPE layer with
# temperature tuning (floor_scale 8); Maverick's interleaved dense / MoE layers; the hybrid window + global pattern.
@pytest.mark.parametrize(
    "preset, overrides",
    [("scout-debug", {}), ("maverick-debug", {}), ("scout-debug", {"attention_pattern": "hybrid"})],
    ids=["scout-debug", "maverick-debug", "scout-debug-hybrid"],
)
def test_greedy_with_cache_equals_full_reforward(preset, overrides, device, gen):
    model = _model(preset, device, **overrides)
    prompt_BS = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen).to(device)
    ours = generate(model, prompt_BS, 24)
    assert ours.shape == (2, 9 + 24)
    assert torch.equal(ours[:, :9], prompt_BS)
    if ours.is_cuda:
        # bf16: a cached decode step and a full forward round differently, so a near-tie may flip and the
        # sequences part. Every token must still be the full forward's argmax on its own prefix, up to
        # the rounding of the logits (one forward over the final sequence gives every prefix's logits).
        with torch.no_grad():
            logits_BNV = model(ours[:, :-1])[:, 9 - 1 :].float()
        chosen_BN = logits_BNV.gather(-1, ours[:, 9:, None]).squeeze(-1)
        assert torch.all(logits_BNV.amax(-1) - chosen_BN <= greedy_tie_tol(logits_BNV))
    else:  # float32 on the CPU kernels: exactly the same tokens
        assert torch.equal(ours, _greedy_without_cache(model, prompt_BS, 24))


def test_single_token_prompt_and_zero_new_tokens(gen):
    model = _model("scout-debug", "cpu")
    prompt_BS = torch.randint(0, model.config.vocab_size, (1, 1), generator=gen)
    assert torch.equal(generate(model, prompt_BS, 5), _greedy_without_cache(model, prompt_BS, 5))
    assert torch.equal(generate(model, prompt_BS, 0), prompt_BS)


def test_stop_tokens_end_each_sequence(gen):
    model = _model("scout-debug", "cpu")
    prompt_BS = torch.randint(0, model.config.vocab_size, (2, 6), generator=gen)
    free = generate(model, prompt_BS, 12)
    # Stop at the token sequence 0 emits 4th; sequence 1 keeps going until it emits it too (or never).
    stop = int(free[0, 6 + 3])
    out = generate(model, prompt_BS, 12, stop_tokens=[stop], pad_token_id=-1)
    first_stop = [next((t for t in range(6, free.shape[1]) if free[b, t] == stop), None) for b in range(2)]
    for b in range(2):
        end = first_stop[b]
        if end is None:
            assert torch.equal(out[b], free[b, : out.shape[1]])
        else:
            assert torch.equal(out[b, : end + 1], free[b, : end + 1])  # identical up to and with the stop token
            assert torch.all(out[b, end + 1 :] == -1)  # padded afterwards
    if all(s is not None for s in first_stop):  # everyone stopped: generation ended there
        assert out.shape[1] == max(first_stop) + 1


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.05, 0.05]]))
    keep = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert keep(1.0) == [True] * 5
    assert keep(0.5) == [True, False, False, False, False]  # the top token alone reaches 0.5
    assert keep(0.51) == [True, False, True, False, False]
    assert keep(0.85) == [True, True, True, False, False]
    assert keep(1e-6) == [True, False, False, False, False]  # the most probable token always stays
    with pytest.raises(ValueError, match="top_p"):
        top_p_filter(logits, 0.0)


def test_sampling_follows_temperature_and_top_p(gen):
    V, draws = 6, 20000
    logits_V = torch.randn(V, generator=gen)
    rows = logits_V.expand(draws, V)
    g = torch.Generator().manual_seed(1)
    for temperature in (0.5, 1.0, 2.0):
        ids = sample_next(rows, temperature=temperature, generator=g)
        freq = torch.bincount(ids, minlength=V).double() / draws
        expected = torch.softmax(logits_V.double() / temperature, -1)
        # 5 binomial standard deviations per id: fails for a wrong temperature, passes by chance < 1e-5.
        sigma = (expected * (1 - expected) / draws).sqrt()
        assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-12), (temperature, freq, expected)
    nucleus = torch.isfinite(top_p_filter(logits_V[None], 0.7))[0]
    ids = sample_next(rows, temperature=1.0, top_p=0.7, generator=g)
    assert nucleus[ids].all()
    assert torch.equal(sample_next(rows[:3], temperature=0.0), logits_V.argmax().expand(3))
    with pytest.raises(ValueError, match="temperature"):
        sample_next(rows, temperature=-1.0)


def test_sampled_generation_is_reproducible(gen):
    model = _model("scout-debug", "cpu")
    prompt_BS = torch.randint(0, model.config.vocab_size, (2, 4), generator=gen)
    run = lambda: generate(  # noqa: E731
        model, prompt_BS, 10, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(run(), run())


def test_bad_arguments():
    model = _model("scout-debug", "cpu")
    with pytest.raises(ValueError, match="input_ids_BS"):
        generate(model, torch.zeros(3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), -1)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # übung ✓"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and all(0 <= i < 256 for i in ids[1:])
    assert tok.decode(ids) == text
    assert tok.decode([*ids, tok.eos_token_id, tok.pad_token_id]) == text
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a truncated UTF-8 sequence still decodes
    assert tok.vocab_size == 259 and tok.stop_token_ids == [tok.eos_token_id]


def test_tokenizer_json_is_used_when_the_checkpoint_has_one(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "llama": 5}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.add_special_tokens(["<s>", "</s>"])
    tk.save(str(tmp_path / "tokenizer.json"))
    config = Llama4Config.preset("scout-debug", vocab_size=6, bos_token_id=1, eos_token_id=[2], pad_token_id=0)
    tok = load_tokenizer(tmp_path, config)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello llama world") == [1, 3, 5, 4]
    assert tok.decode([1, 3, 5, 2]) == "hello llama"
    assert tok.stop_token_ids == [2]
    # No tokenizer.json: bytes, which a 256-id vocabulary cannot hold.
    assert isinstance(load_tokenizer(None, Llama4Config.preset("scout-debug", vocab_size=300)), ByteTokenizer)
    with pytest.raises(ValueError, match="vocab_size=256"):
        load_tokenizer(tmp_path / "missing", Llama4Config.preset("scout-debug"))


def test_generate_decodes_text_end_to_end():
    tok = ByteTokenizer()
    model = _model("scout-debug", "cpu", vocab_size=tok.vocab_size)
    prompt = torch.tensor([tok.encode("hi")])
    out = generate(model, prompt, 8, stop_tokens=tok.stop_token_ids)
    assert 3 <= out.shape[1] <= 3 + 8
    assert tok.decode(out[0].tolist()).startswith("hi")
