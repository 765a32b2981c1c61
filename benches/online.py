"""The online Hadamards' share of a decoder layer's CPU forward time (QuaRot/SpinQuant R3 and R4).

    python benches/online.py [--threads 2] [--tokens 512,1] [--repeats 20]

One decoder layer of SmolLM2-135M (hidden 576 = 36·16, MLP 1536 = 12·128, 9/3 heads of 64),
rotated by QuaRot, in full precision, batch 1. For each sequence length it times

* the layer's forward with R3 (queries/keys after RoPE) and R4 (``down_proj`` input) attached;
* the same layer with them detached (the weights do not change the cost), in interleaved rounds;
* the three Hadamard calls alone on tensors of the same shapes (q: 9 heads, k: 3 heads, down input);

and reports the share ``(with − without) / with`` and ``hadamards alone / with``. Target ≤ 10 %.
Writes ``benches/results/<date>-online-hadamard.{json,md}`` unless ``--no-write``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _results import write_results


def _time(fn, repeats: int) -> float:
    fn()
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", default="512,1")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import lowbit
    from lowbit.methods.quarot import quarot
    from lowbit.nn import attach_input_transform, input_transform_of, online_hadamard
    from lowbit.nn.attention import install_attention

    torch.set_num_threads(args.threads)
    lowbit.set_num_threads(args.threads)
    cfg = LlamaConfig(  # SmolLM2-135M's widths, one layer (weights do not change the timing)
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=1, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    quarot(model, seed=0)
    layer = model.model.layers[0]
    attn, down = layer.self_attn, layer.mlp.down_proj
    rotary = model.model.rotary_emb
    r4 = input_transform_of(down)

    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        x = torch.randn(1, T, 576)
        pos = torch.arange(T).unsqueeze(0)
        pe = rotary(x, pos)
        mask = None if T == 1 else torch.full((T, T), float("-inf")).triu(1)[None, None]

        @torch.no_grad()
        def forward():
            layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)

        def online(on: bool) -> None:
            install_attention(attn, rotary=rotary, rotate_qk=on, kv=None)
            attach_input_transform(down, r4 if on else None)

        samples: dict[bool, list] = {True: [], False: []}
        for _ in range(5):  # interleaved rounds, so drift (frequency, page cache) hits both alike
            for on in (True, False):
                online(on)
                samples[on].append(_time(forward, max(1, args.repeats // 5)))
        online(True)
        with_online, without = statistics.median(samples[True]), statistics.median(samples[False])

        q = torch.randn(1, 9, T, 64)
        k = torch.randn(1, 3, T, 64)
        h = torch.randn(1, T, 1536)
        alone = _time(lambda: (online_hadamard(q), online_hadamard(k), online_hadamard(h)), args.repeats)
        rows.append({
            "tokens": T, "layer_with_online_s": with_online, "layer_without_s": without, "hadamards_alone_s": alone,
            "share_diff": (with_online - without) / with_online, "share_alone": alone / with_online,
        })
        print(f"T={T}: layer {with_online * 1e3:.3f} ms with R3+R4, {without * 1e3:.3f} ms without; "
              f"Hadamards alone {alone * 1e3:.3f} ms = {alone / with_online:.1%}", flush=True)

    head = (f"Online Hadamards (R3 on q/k, 64 = 2^6; R4 on the down_proj input, 1536 = 12·128) in one SmolLM2-135M "
            f"decoder layer, fp32, batch 1, {args.threads} threads, median of {args.repeats}")
    md = [head, "", "| tokens | layer with R3+R4 | layer without | Hadamards alone | share (difference) | share (alone) | target |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "pass" if max(r["share_alone"], r["share_diff"]) <= 0.10 else "**short**"
        md.append(f"| {r['tokens']} | {r['layer_with_online_s'] * 1e3:.3f} ms | {r['layer_without_s'] * 1e3:.3f} ms | "
                  f"{r['hadamards_alone_s'] * 1e3:.3f} ms | {r['share_diff']:.1%} | {r['share_alone']:.1%} | ≤ 10 %: {ok} |")
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        write_results("online-hadamard", {"settings": vars(args), "rows": rows}, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
