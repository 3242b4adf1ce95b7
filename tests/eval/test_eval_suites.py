"""Evaluation suites: WinoGrande partial scoring, reward-model accuracy, chat signals, the runner.

Stub scorers with known log-probabilities / answers pin the logic; the real SmolLM2 and a tiny
random Llama check that the real path computes the same numbers, end to end and on 2 Ray actors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hetray.eval import chat, reward, winogrande
from hetray.eval.config import SUITE_NAMES, EvalConfig
from hetray.eval.pool import split_evenly
from hetray.eval.run import EvalError, parse_models, run_eval
from hetray.eval.suites import SUITES
from hetray.eval.winogrande import WinoGrandeError

from conftest import FIXTURES

HERE = FIXTURES / "eval_suites"
SMALL = str(HERE / "winogrande_small.jsonl")


def run_suite(name: str, model, cfg: EvalConfig, reward_model: str | None = None) -> tuple[dict, list[dict]]:
    """A suite's own steps, as the runner takes them: load, score, aggregate."""
    suite = SUITES[name]
    records = suite.score(model, suite.load(cfg, reward_model), cfg)
    return suite.aggregate(records), records


def test_every_suite_is_declared_once_in_report_order():
    assert tuple(SUITES) == SUITE_NAMES == ("winobias", "winogender", "winogrande", "reward", "chat")
    assert [s.kind for s in SUITES.values()] == ["policy", "policy", "policy", "reward", "policy"]
    assert {s.name for s in SUITES.values() if s.by_group} == {"winobias", "winogender"}


# ---------------------------------------------------------------------------- WinoGrande


class LogprobStub:
    """continuation_logprobs from a table {(context, continuation): per-token log-probs}."""

    def __init__(self, table: dict):
        self.table, self.calls = table, []

    def continuation_logprobs(self, prompts, continuations):
        self.calls.append((list(prompts), list(continuations)))
        return [self.table[(p, c)] for p, c in zip(prompts, continuations)]


def test_partial_contexts_and_target_follow_the_harness():
    s = "The trophy would not fit into the suitcase because the _ was too large."
    assert winogrande.partial_context(s, "trophy") == "The trophy would not fit into the suitcase because the trophy"
    assert winogrande.partial_target(s) == " was too large."
    assert winogrande.partial_target("So _  stayed home. ") == " stayed home."


def test_partial_scoring_picks_the_option_with_the_higher_total_logprob():
    large = "The trophy would not fit into the suitcase because the "
    rain = "Megan lent her umbrella to Rachel because "
    table = {
        # item 1 (answer 1): per token -1,-1,-1 = -3 vs -0.5,-3 = -3.5 -> option 1, right
        (large + "trophy", " was too large."): [-1.0, -1.0, -1.0],
        (large + "suitcase", " was too large."): [-0.5, -3.0],
        # item 2 (answer 2): the SUM decides (-4 vs -4.5), not the best token -> option 1, wrong
        (large + "trophy", " was too small."): [-2.0, -2.0],
        (large + "suitcase", " was too small."): [-0.1, -4.4],
        # item 3 (answer 2): option 2 far more likely -> right
        (rain + "Megan", " was about to walk home in the rain."): [-9.0],
        (rain + "Rachel", " was about to walk home in the rain."): [-1.0],
    }
    stub = LogprobStub(table)
    overall, records = run_suite("winogrande", stub, EvalConfig(winogrande={"path": SMALL}))
    assert [r["pred"] for r in records] == [1, 1, 2]
    assert [r["correct"] for r in records] == [True, False, True]
    assert records[1]["logprob1"] == pytest.approx(-4.0) and records[1]["logprob2"] == pytest.approx(-4.5)
    assert overall == {"accuracy": pytest.approx(2 / 3), "items": 3}
    # one batched call: both options of every item, the same continuation for both
    (prompts, conts), = stub.calls
    assert len(prompts) == 6 and conts[0] == conts[1] == " was too large."


def test_tie_goes_to_option1_and_limit():
    large = "The trophy would not fit into the suitcase because the "
    table = {(large + o, " was too large."): [-1.0] for o in ("trophy", "suitcase")}
    overall, records = run_suite("winogrande", LogprobStub(table), EvalConfig(winogrande={"path": SMALL, "limit": 1}))
    assert overall == {"accuracy": 1.0, "items": 1} and records[0]["pred"] == 1


def test_bundled_sample_loads_and_skips_unanswered_rows(tmp_path):
    items = winogrande.load_items("sample:winogrande.jsonl")
    assert len(items) == 24 and all(i["answer"] in (1, 2) for i in items)  # line 25 is a test-split row
    (tmp_path / "test.jsonl").write_text('{"sentence": "A _ b.", "option1": "a", "option2": "b"}\n')
    with pytest.raises(WinoGrandeError, match="no rows with an answer"):
        winogrande.load_items(str(tmp_path / "test.jsonl"))
    with pytest.raises(WinoGrandeError, match="does not exist"):
        winogrande.load_items(str(tmp_path / "nope.jsonl"))


def test_bad_row_names_file_and_line():
    with pytest.raises(WinoGrandeError, match=r"winogrande_bad\.jsonl:3: field 'answer'"):
        winogrande.load_items(str(HERE / "winogrande_bad.jsonl"))


@pytest.mark.parametrize("row, message", [
    ('{"sentence": "No blank here.", "option1": "a", "option2": "b", "answer": "1"}', "exactly one '_'"),
    ('{"sentence": "A _ and _.", "option1": "a", "option2": "b", "answer": "1"}', "exactly one '_'"),
    ('{"sentence": "Ends with the _", "option1": "a", "option2": "b", "answer": "1"}', "nothing follows the blank"),
    ('{"sentence": "A _ b.", "option1": "a", "answer": "1"}', "'option2'"),
    ('{"sentence": "A _ b.", "option1": "a", "option2": "b", "answer": "3"}', "'answer' is '3'"),
    ('{"sentence": "A _ b.", "option1": "a",', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
])
def test_bad_rows_are_refused(tmp_path, row, message):
    f = tmp_path / "wg.jsonl"
    f.write_text('{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "2"}\n' + row + "\n")
    with pytest.raises(WinoGrandeError, match=rf"wg\.jsonl:2: .*{message}"):
        winogrande.load_items(str(f))


@pytest.fixture(scope="module")
def smollm2():
    from hetray.eval.scoring import Scorer

    return Scorer.load("smollm2-135m-instruct", batch_size=4, device="cpu")


@pytest.mark.slow
def test_real_model_partial_scores_match_a_plain_forward_pass(smollm2):
    """The suite's numbers on SmolLM2 equal a hand-rolled, unbatched forward pass."""
    overall, records = run_suite("winogrande", smollm2, EvalConfig(winogrande={"path": SMALL}))
    model, tok = smollm2.model, smollm2.tokenizer
    for r in records:
        target = winogrande.partial_target(r["sentence"])
        for k in (1, 2):
            context = winogrande.partial_context(r["sentence"], r[f"option{k}"])
            n_ctx = len(tok(context)["input_ids"])
            ids = tok(context + target)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            expected = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
            assert r[f"logprob{k}"] == pytest.approx(expected, abs=1e-3)
        assert r["pred"] == (1 if r["logprob1"] >= r["logprob2"] else 2)
    assert overall["items"] == 3
    assert overall["accuracy"] == sum(r["correct"] for r in records) / 3


# ---------------------------------------------------------------------------- reward model


GOOD = 7


class CountGood(torch.nn.Module):
    """A 'reward model': r = how many GOOD tokens the unpadded sequence holds."""

    def forward(self, input_ids, attention_mask):
        r = ((input_ids == GOOD) & attention_mask.bool()).sum(-1).float()
        return type("Out", (), {"logits": r[:, None]})


class IdTokenizer:
    """Text of integers -> those ids (no chat template); EOS is id 0, padding id GOOD (so a
    padded position would count if the mask were ignored)."""

    eos_token, pad_token_id, chat_template = "0", GOOD, None

    def __call__(self, text, **kw):
        return {"input_ids": [int(t) for t in text.split()]}


def stub_pairs():
    return [  # prompt / chosen / rejected as pair_rows makes them without a chat template
        {"prompt": "1", "chosen": " 7 7 ", "rejected": " 2 "},    # 2 vs 0: right
        {"prompt": "7", "chosen": " 2 ", "rejected": " 7 3 "},    # 1 vs 2: wrong
        {"prompt": "1", "chosen": " 7 ", "rejected": " 7 "},      # tie: not counted as right
        {"prompt": "1 2 3 4 5", "chosen": " 7 ", "rejected": " 1 "},  # long prompt: padding
    ]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_reward_pairwise_accuracy_on_a_stub(batch_size):
    rm = reward.RewardModel(CountGood(), IdTokenizer(), batch_size=batch_size)
    records = reward.score_items(rm, stub_pairs())
    # texts as TRL builds them: prompt + answer + EOS ("1 7 7 0" holds two GOOD tokens)
    assert [(r["reward_chosen"], r["reward_rejected"]) for r in records] == [(2, 0), (1, 2), (1, 1), (1, 0)]
    assert [r["correct"] for r in records] == [True, False, False, True]
    overall = reward.aggregate(records)
    assert overall["accuracy"] == 0.5 and overall["pairs"] == 4
    assert overall["margin"] == pytest.approx((2 - 1 + 0 + 1) / 4)


def _reward_run(root: Path, tiny_llama: str) -> Path:
    """A run folder as the reward stage leaves it: pairs, reward/merged, reward/manifest.json
    (the manifest's fields that the evaluation reads, written by hand)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hetray.models import load_tokenizer
    from hetray.schema import PREFERENCE_SCHEMA, make_id
    from hetray.stage import write_manifest

    pairs = [{"pair_id": make_id("p", str(i)), "prompt": f"Question number {i}?", "chosen": f"Good answer {i}.",
              "rejected": "No.", "source": "t", "quality": None, "provenance": [str(i)]} for i in range(40)]
    (root / "selected").mkdir(parents=True)
    table = pa.Table.from_pylist([{k: p.get(k) for k in PREFERENCE_SCHEMA.names} for p in pairs], PREFERENCE_SCHEMA)
    pq.write_table(table, root / "selected" / "part-0.parquet")
    merged = root / "reward" / "merged"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tiny_llama, num_labels=1)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(merged)
    load_tokenizer(tiny_llama).save_pretrained(merged)
    write_manifest(root / "reward", {"stage": "train-reward", "data": "selected",
                                     "config": {"settings": {"eval_fraction": 0.25}, "seed": 3}})
    return root


def test_reward_held_out_pairs_are_the_reward_stages_split(tmp_path, tiny_llama):
    from hetray.pairs import split_pairs

    run = _reward_run(tmp_path / "run", tiny_llama)
    got = reward.load_items(str(run / "reward"), EvalConfig().reward)
    train, expected = split_pairs(run / "selected", 0.25, 3, chat=True)
    assert got == expected and 3 <= len(got) <= 20 and len(got) + len(train) == 40
    assert not {p["prompt"][0]["content"] for p in got} & {p["prompt"][0]["content"] for p in train}
    assert got != split_pairs(run / "selected", 0.25, 4, chat=True)[1]  # the manifest's seed decides
    assert got[0]["prompt"] == [{"role": "user", "content": got[0]["prompt"][0]["content"]}]  # chat turns
    assert set(got[0]) == {"prompt", "chosen", "rejected"}
    # the run dir and the merged checkpoint find the same stage; limit cuts
    assert reward.load_items(str(run), EvalConfig().reward) == got
    assert reward.load_items(str(run / "reward" / "merged"), EvalConfig(reward={"limit": 2}).reward) == got[:2]


def test_reward_manifest_without_the_split_is_named(tmp_path, tiny_llama):
    from hetray.stage import write_manifest

    run = _reward_run(tmp_path / "run", tiny_llama)
    write_manifest(run / "reward", {"stage": "train-reward", "config": {"settings": {"eval_fraction": 0.25}, "seed": 3}})
    with pytest.raises(reward.RewardEvalError, match=r"manifest\.json: no 'data'"):
        reward.load_items(str(run / "reward"), EvalConfig().reward)
    write_manifest(run / "reward", {"stage": "train-reward", "data": "gone",
                                    "config": {"settings": {"eval_fraction": 0.25}, "seed": 3}})
    with pytest.raises(reward.RewardEvalError, match=r"the pairs it was trained on \(.*run/gone\) are gone"):
        reward.load_items(str(run / "reward"), EvalConfig().reward)


def test_reward_suite_on_a_tiny_classifier(tmp_path, tiny_llama):
    run = _reward_run(tmp_path / "run", tiny_llama)
    cfg = EvalConfig(batch_size=3, device="cpu")
    rm = reward.RewardModel.load(str(run / "reward"), batch_size=3, device="cpu")
    overall, records = run_suite("reward", rm, cfg, reward_model=str(run / "reward"))
    one = reward.RewardModel.load(str(run / "reward" / "merged"), batch_size=1, device="cpu")
    pairs = reward.load_items(str(run), cfg.reward)
    one_by_one = [one.rewards([one.token_ids(p["prompt"], p[k])])[0] for p in pairs for k in ("chosen", "rejected")]
    got = [x for r in records for x in (r["reward_chosen"], r["reward_rejected"])]
    assert got == pytest.approx(one_by_one, abs=1e-4)  # right padding changes nothing
    assert overall["pairs"] == len(pairs) == len(records)
    assert overall["accuracy"] == sum(a > b for a, b in zip(one_by_one[::2], one_by_one[1::2])) / len(pairs)
    assert records[0]["prompt"] == pairs[0]["prompt"][0]["content"]


def test_reward_model_without_a_stage_needs_pairs(tmp_path, tiny_llama):
    run = _reward_run(tmp_path / "run", tiny_llama)
    lone = tmp_path / "lone"
    (run / "reward" / "merged").rename(lone)
    with pytest.raises(reward.RewardEvalError, match="no reward-stage manifest"):
        reward.load_items(str(lone), EvalConfig().reward)
    pairs = reward.load_items(str(lone), EvalConfig(reward={"pairs": str(run / "selected")}).reward)
    assert len(pairs) == 40 and set(pairs[0]) == {"prompt", "chosen", "rejected"}
    assert pairs[5]["chosen"] == [{"role": "assistant", "content": "Good answer 5."}]


# ---------------------------------------------------------------------------- chat


def test_repeated_ngram_rate():
    assert chat.repeated_ngram_rate("one two three four five") == 0.0
    # 8 words -> 5 four-grams, "a b c d" twice, "b c d a" once... unique 4 of 5
    assert chat.repeated_ngram_rate("a b c d a b c d") == pytest.approx(1 - 4 / 5)
    assert chat.repeated_ngram_rate("la " * 20) == pytest.approx(1 - 1 / 17)
    assert chat.repeated_ngram_rate("too short") == 0.0
    # a numbered list stuck in a loop: the counters do not make the 4-grams new
    assert chat.repeated_ngram_rate("12. Asia 13. Asia 14. Asia 15. Asia 16. Asia") == pytest.approx(1 - 1 / 2)


def test_prompt_repetition():
    p = "How do I make a cup of green tea?"
    assert chat.repeats_prompt(p, "how do I make a cup of green tea")  # echo, case and punctuation aside
    assert chat.repeats_prompt(p, "How do I make a cup of green tea? How do I make")
    assert chat.repeats_prompt(p, "green tea")  # a piece of the prompt
    assert not chat.repeats_prompt(p, "Boil water, let it cool to 80 C, steep the leaves for 2 minutes.")
    assert not chat.repeats_prompt(p, "   ")  # empty is not a repetition (it is empty)


class ChatStub:
    """Answers word by word: an answer shorter than max_new_tokens words ended at an EOS."""

    def __init__(self, answers):
        self.answers, self.calls = answers, []
        self.tokenizer = WithChatTemplate()

    def generations(self, prompts, max_new_tokens, chat=False):
        from hetray.eval.scoring import Generation

        self.calls.append((list(prompts), max_new_tokens, chat))
        words = [len(self.answers[p].split()) for p in prompts]
        return [Generation(self.answers[p], n, n < max_new_tokens) for p, n in zip(prompts, words)]


class WithChatTemplate:
    chat_template = "{{ messages }}"  # has one: prompts go through it


def test_chat_signals_and_rates():
    answers = {
        "p1": "Sure: Paris, Rome and Kyoto.",                # 5 tokens < 6: stops
        "p2": "",                                            # empty
        "p3": "go go go go go go",                           # 6 tokens = max: cut; loops
        "p4": "p4",                                          # echoes the prompt
    }
    stub = ChatStub(answers)
    o, records = run_suite("chat", stub, EvalConfig(chat={"prompts": list(answers), "max_new_tokens": 6}))
    assert stub.calls == [(list(answers), 6, True)]
    r = {x["prompt"]: x for x in records}
    assert [r[p]["non_empty"] for p in answers] == [True, False, True, True]
    assert [r[p]["stops"] for p in answers] == [True, True, False, True]
    assert [r[p]["repeats_prompt"] for p in answers] == [False, False, False, True]
    assert r["p3"]["repeated_ngram_rate"] == pytest.approx(1 - 1 / 3)
    assert o["responses"] == 4
    assert (o["non_empty_rate"], o["stop_rate"], o["prompt_repeat_rate"]) == (0.75, 0.75, 0.25)
    assert o["repeated_ngram_rate"] == pytest.approx((1 - 1 / 3) / 4)
    assert o["mean_new_tokens"] == pytest.approx((5 + 0 + 6 + 1) / 4)


def successor_scorer(successor: dict[str, str], pad_is_eos: bool = False):
    """A Scorer on a word-level LM whose greedy next token is ``successor[last token]``; "</s>" is
    its EOS (the id ``generate`` stops at)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from hetray.eval.scoring import Scorer

    vocab = {"[PAD]": 0, "[UNK]": 1, "</s>": 2}
    for w in [*successor, *successor.values()]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="</s>" if pad_is_eos else "[PAD]",
                                        unk_token="[UNK]", eos_token="</s>")
    table = torch.full((len(vocab), len(vocab)), -10.0)
    for a, b in successor.items():
        table[vocab[a], vocab[b]] = 10.0

    class SuccessorLM(PreTrainedModel, GenerationMixin):
        config_class = PretrainedConfig

        def __init__(self, config):
            super().__init__(config)
            self.table = torch.nn.Embedding.from_pretrained(table)

        def get_output_embeddings(self):
            return self.table

        def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, **kw):
            return CausalLMOutputWithPast(logits=self.table(input_ids))

    model = SuccessorLM(PretrainedConfig(vocab_size=len(vocab), pad_token_id=tokenizer.pad_token_id))
    model.generation_config.use_cache = False
    model.generation_config.eos_token_id = vocab["</s>"]
    return Scorer(model, tokenizer, batch_size=4)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_chat_counts_the_generated_token_ids(pad_is_eos):
    # "well-known" is ONE generated token whose text re-tokenises to three ("well", "-", "known"):
    # counting the text would give 3 per token and overshoot max_new_tokens
    scorer = successor_scorer({"go": "well-known", "well-known": "well-known", "a": "b", "b": "c", "c": "</s>",
                               "stop": "</s>"}, pad_is_eos)
    prompts = ["go", "a", "stop", "b"]  # one batch: rows that stop early are padded by generate
    records = {r["prompt"]: r for r in chat.score_items(scorer, prompts, max_new_tokens=5)}
    assert {p: (r["new_tokens"], r["stops"]) for p, r in records.items()} == {
        "go": (5, False), "a": (2, True), "stop": (0, True), "b": (1, True)}
    assert records["go"]["response"] == " ".join(["well-known"] * 5) and records["a"]["response"] == "b c"
    assert len(scorer.tokenizer(records["go"]["response"], add_special_tokens=False)["input_ids"]) == 15
    assert not records["stop"]["non_empty"]
    # an EOS as the very last allowed token still counts as stopping; max_new_tokens is never exceeded
    last = {r["prompt"]: r for r in chat.score_items(scorer, ["a", "go"], max_new_tokens=3)}
    assert (last["a"]["new_tokens"], last["a"]["stops"]) == (2, True)
    assert (last["go"]["new_tokens"], last["go"]["stops"]) == (3, False)
    assert scorer.generate(["a", "go"], 3) == ["b c", "well-known well-known well-known"]


def test_chat_side_by_side(tmp_path):
    recs = {m: run_suite("chat", ChatStub({"Hi?": f"Hello from {m}."}), EvalConfig(chat={"prompts": ["Hi?"]}))[1]
            for m in ("base", "sft")}
    paths = chat.write_side_by_side(recs, tmp_path)
    assert paths == {"chat_markdown": "chat.md", "chat_jsonl": "chat.jsonl"}  # relative to the folder
    md = (tmp_path / paths["chat_markdown"]).read_text()
    assert "## 1. Hi?" in md and "> Hello from base." in md and "> Hello from sft." in md
    assert md.index("**base**") < md.index("**sft**")
    lines = [json.loads(x) for x in (tmp_path / paths["chat_jsonl"]).read_text().splitlines()]
    assert [(x["model"], x["response"]) for x in lines] == [("base", "Hello from base."), ("sft", "Hello from sft.")]


# ---------------------------------------------------------------------------- the runner


def test_split_evenly_and_parse_models():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 2) == [[1], []]
    assert parse_models("base=smollm2-135m-instruct, sft=runs/x/sft/merged") == {
        "base": "smollm2-135m-instruct", "sft": "runs/x/sft/merged"}
    assert parse_models("runs/a") == {"runs/a": "runs/a"}
    with pytest.raises(EvalError, match="twice"):
        parse_models("a=x,a=y")


def test_eval_config_from_a_job_file_with_overrides(tmp_path):
    from hetray.config import ConfigError
    from hetray.eval.run import eval_config

    job = tmp_path / "job.yaml"
    job.write_text("seed: 7\nconvert:\n  sources: [{name: wg, format: winogrande, path: x.jsonl}]\n"
                   "eval:\n  batch_size: 3\n  chat: {max_new_tokens: 5}\n")
    cfg, seed = eval_config(str(job), ["eval.winogrande.limit=4", "device=cpu"], "winogrande,chat")
    assert (cfg.batch_size, cfg.chat.max_new_tokens, cfg.winogrande.limit, cfg.device, seed) == (3, 5, 4, "cpu", 7)
    assert cfg.suites == ["winogrande", "chat"]
    cfg, seed = eval_config(None, [], None)
    assert cfg == EvalConfig() and seed is None
    with pytest.raises(ConfigError, match="unknown key 'eval.winogrande.limt'"):
        eval_config(None, ["winogrande.limt=3"], None)
    with pytest.raises(ConfigError, match=r"'eval.suites.0': Input should be"):
        eval_config(None, [], "nope")


def test_unknown_model_is_named(tmp_path):
    with pytest.raises(EvalError, match=r"model 'sft' \(runs/nowhere/sft/merged\)"):
        run_eval({"sft": "runs/nowhere/sft/merged"}, EvalConfig(suites=["chat"]), tmp_path)


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(suites=["winobias", "winogender", "winogrande", "chat"], batch_size=4, device="cpu",
                      max_new_tokens=4, winobias={"limit": 2, "types": [1]}, winogrande={"limit": 8},
                      winogender={"path": str(HERE / "winogender.tsv")},
                      chat={"prompts": ["Hi!", "Name a colour.", "Count to three."], "max_new_tokens": 6}, **kw)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("eval1")
    return out, run_eval({"tiny": tiny_llama}, _cfg(), out, seed=0)


@pytest.mark.slow
def test_run_eval_end_to_end(in_process, tiny_llama):
    out, result = in_process
    m = result["tiny"]
    assert m["winogrande"]["items"] == 8 and 0 <= m["winogrande"]["accuracy"] <= 1
    assert m["chat"]["responses"] == 3
    assert m["winobias"]["pairs"] == 2 and m["winobias"]["bias"] >= 0
    assert m["winogender"]["pairs"] == 2 and "accuracy_male" in m["winogender"]
    groups = json.loads((out / "metrics.json").read_text())["_meta"]["by_group"]["tiny"]
    assert list(groups["winobias"]) == ["type1/dev"] and set(groups["winogender"]) == {"occupation", "participant"}
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tiny"] == m and saved["_meta"]["models"] == {"tiny": tiny_llama}
    assert set(saved["_meta"]["wall_time_s"]["tiny"]) == {"winobias", "winogender", "winogrande", "chat"}
    assert saved["_meta"]["config"]["winogrande"]["limit"] == 8 and "torch" in saved["_meta"]["versions"]
    wg = pq.read_table(out / "records" / "winogrande.parquet").to_pylist()
    assert len(wg) == 8 and {r["model"] for r in wg} == {"tiny"}
    assert m["winogrande"]["accuracy"] == sum(r["correct"] for r in wg) / 8
    assert (out / "chat.md").is_file() and len((out / "chat.jsonl").read_text().splitlines()) == 3
    report = (out / "report.md").read_text()
    assert f"{m['winogrande']['accuracy']:.3f}" in report and f"{m['winobias']['bias']:.3f}" in report
    assert "Gender bias on WinoGender" in report and f"{m['winogender']['bias_entropy']:.3f}" in report
    assert (out / "report.html").is_file() and (out / "winobias_bias_accuracy.png").stat().st_size > 0


def flat(overall: dict) -> dict:
    """Overall metrics with each ``<metric>_ci`` [lo, hi] as two numbers (pytest.approx compares no lists in dicts)."""
    out = {}
    for k, v in overall.items():
        out.update({f"{k}.lo": v[0], f"{k}.hi": v[1]} if k.endswith("_ci") else {k: v})
    return out


@pytest.mark.slow
def test_two_ray_workers_give_the_same_metrics(in_process, tiny_llama, ray_local, tmp_path):
    _, one = in_process
    two = run_eval({"tiny": tiny_llama}, _cfg(num_workers=2), tmp_path, seed=0)
    assert two["tiny"]["winogrande"] == one["tiny"]["winogrande"]
    for suite, tol in (("chat", 1e-9), ("winobias", 1e-4), ("winogender", 1e-4)):
        assert flat(two["tiny"][suite]) == pytest.approx(flat(one["tiny"][suite]), abs=tol), suite
    a = pq.read_table(tmp_path / "records" / "winogrande.parquet").to_pylist()
    b = pq.read_table(in_process[0] / "records" / "winogrande.parquet").to_pylist()
    assert [r["id"] for r in a] == [r["id"] for r in b]  # concatenated in item order
    assert [r["logprob1"] for r in a] == pytest.approx([r["logprob1"] for r in b], abs=1e-4)


def test_run_eval_reward_suite_finds_the_runs_reward_model(tmp_path, tiny_llama):
    import shutil

    run = _reward_run(tmp_path / "run", tiny_llama)
    shutil.copytree(tiny_llama, run / "ppo" / "merged")
    models = {"ppo": str(run / "ppo" / "merged"), "base": tiny_llama}
    cfg = EvalConfig(suites=["reward"], device="cpu")
    result = run_eval(models, cfg, tmp_path / "eval")
    rm = reward.RewardModel.load(str(run / "reward"), batch_size=cfg.batch_size, device="cpu")
    alone, records = run_suite("reward", rm, cfg, reward_model=str(run / "reward"))
    point = {k: v for k, v in result["ppo"]["reward"].items() if not k.endswith("_ci")}
    assert point == pytest.approx({**alone, "reward_model": str(run / "reward")}, abs=1e-5)
    lo, hi = result["ppo"]["reward"]["accuracy_ci"]  # floats get a CI, the pair count does not
    assert 0 <= lo <= alone["accuracy"] <= hi <= 1 and "pairs_ci" not in result["ppo"]["reward"]
    assert result["base"] == {}  # no reward model goes with the bare base model
    assert result["_meta"]["reward_models"] == {"ppo": str(run / "reward")}
    given = run_eval({"base": tiny_llama}, cfg, tmp_path / "e2", extra={"base": {"reward_model": str(run)}})
    assert given["base"]["reward"]["accuracy"] == alone["accuracy"]
    saved = pq.read_table(tmp_path / "eval" / "records" / "reward.parquet").to_pylist()
    assert len(saved) == alone["pairs"] == len(records)
    assert {(r["model"], r["reward_model"]) for r in saved} == {("ppo", str(run / "reward"))}
    with pytest.raises(EvalError, match="no reward model"):
        run_eval({"base": tiny_llama}, EvalConfig(suites=["reward"]), tmp_path / "none")


def test_outputs_are_relative_to_the_eval_folder(tmp_path, tiny_llama):
    cfg = EvalConfig(suites=["chat"], device="cpu", chat={"prompts": ["Hi!", "Name a colour."], "max_new_tokens": 3})
    result = run_eval({"a": tiny_llama, "b": tiny_llama}, cfg, tmp_path / "tmp-eval", seed=0)
    (tmp_path / "tmp-eval").rename(tmp_path / "eval")  # as the pipeline moves its temporary folder
    out = tmp_path / "eval"
    saved = json.loads((out / "metrics.json").read_text())
    outputs = saved["_meta"]["outputs"]
    lm_eval = outputs.pop("lm_eval")
    assert outputs == {"records": {"chat": "records/chat.parquet"}, "chat_markdown": "chat.md",
                       "chat_jsonl": "chat.jsonl", "report": {"markdown": "report.md", "html": "report.html",
                                                              "plots": []},
                       "tensorboard": {"a": "tensorboard/a", "b": "tensorboard/b"}}
    assert set(lm_eval) == {"a", "b"} and all((out / p).is_file() and p.startswith(f"lm_eval/{m}/results_")
                                              for m, p in lm_eval.items())
    assert saved["a"]["chat"] == result["b"]["chat"] and saved["a"]["chat"]["responses"] == 2  # one model, twice
    rows = pq.read_table(out / outputs["records"]["chat"]).to_pylist()
    assert [r["model"] for r in rows] == ["a", "a", "b", "b"]
    assert saved["a"]["chat"]["mean_new_tokens"] == pytest.approx(sum(r["new_tokens"] for r in rows[:2]) / 2)
    assert all(0 <= r["new_tokens"] <= 3 and r["stops"] == (r["new_tokens"] < 3) for r in rows)  # random: no EOS
    assert "[chat.md](chat.md)" in (out / outputs["report"]["markdown"]).read_text()
    assert len((out / outputs["chat_jsonl"]).read_text().splitlines()) == 4


def test_several_workers_need_a_running_ray(tmp_path, tiny_llama, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    cfg = EvalConfig(suites=["chat"], device="cpu", num_workers=2)
    with pytest.raises(EvalError, match="eval.num_workers > 1 needs a running Ray"):
        run_eval({"tiny": tiny_llama}, cfg, tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


def test_cli_runs_and_reports_bad_input(tmp_path, tiny_llama, capsys):
    from hetray.cli import main

    out = tmp_path / "eval"
    assert main(["eval", "--models", f"tiny={tiny_llama}", "--suites", "chat", "--out", str(out),
                 "eval.chat.max_new_tokens=2", "chat.prompts=[Hi!]", "device=cpu"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["tiny"]["chat"]["responses"] == 1 and saved["_meta"]["seed"] == 0
    printed = capsys.readouterr().out
    assert "tiny chat       responses 1" in printed
    assert f"metrics: {out / 'metrics.json'}" in printed and f"report:  {out / 'report.md'}" in printed
    assert main(["eval", "--models", "x=/no/such/model", "--out", str(tmp_path / "x")]) == 2
    assert "model 'x' (/no/such/model)" in capsys.readouterr().err
    assert main(["eval", "--models", f"t={tiny_llama}", "--suites", "nope", "--out", str(tmp_path / "y")]) == 2
    assert "'eval.suites.0'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_eval_readers_strip_a_utf8_bom(tmp_path):
    """A BOM (as Excel and Notepad write it) must not turn the first row into an error."""
    from hetray.eval import winobias, winogender

    wg = tmp_path / "wg.jsonl"
    wg.write_bytes(b'\xef\xbb\xbf{"qID": "q1", "sentence": "A _ b.", "option1": "a", "option2": "b", "answer": "1"}\n')
    assert [(i["option1"], i["option2"]) for i in winogrande.load_items(str(wg))] == [("a", "b")]
    src = FIXTURES / "winobias" / "pro_stereotyped_type1.txt.dev"
    wb = tmp_path / src.name
    wb.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    assert winobias.read_lines(wb) == winobias.read_lines(src)
    src = FIXTURES / "winogender" / "all_sentences.tsv"
    g = tmp_path / src.name
    g.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    assert winogender.read_rows(g) == winogender.read_rows(src)
