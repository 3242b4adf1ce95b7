"""Benchmark: batched WinoBias evaluation vs a naive one-prompt-at-a-time loop, same run.

    python benchmarks/bench_eval.py                       # all of dev (2 x 396 pairs), naive on 2 x 50
    python benchmarks/bench_eval.py --limit 20 --naive-limit 10 --out bench_eval_quick   # a quick check

Data: the real WinoBias dev files in ../shared/data/winobias (type 1 and type 2, pro and anti:
four files, 396 pairs per type). Model: the bundled SmolLM2-135M-Instruct, fp32 on CPU.

* ``batched``: the WinoBias suite's own steps (``SUITES["winobias"]``: load, then score with
  hetray.eval.scoring.Scorer: length-sorted, left-padded batches of ``--batch-size`` prompts, one
  forward pass per batch for all log-probs and the next-token distribution, batched greedy
  generation that stops once every answer is complete).
* ``naive``: plain transformers, one prompt at a time: a forward pass over ``prompt + cluster``
  (full logits, log-softmax), then ``model.generate`` of ``max_new_tokens`` for the same prompt;
  the same tokenisation rule and answer reading, written out again here. It runs on the first
  ``--naive-limit`` pairs per type (the full loop takes too long on 2 shared cores), and the
  batched evaluation is timed on exactly those pairs too, so the speed ratio compares equal work.
  Every per-pair number of the naive loop must match the batched one to 1e-4, and every answer
  must be the same; the benchmark fails otherwise.

Results: benchmarks/results/<out>.{json,md} (default ``bench_eval``), with the metric values
of the base model on all of dev.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "winobias"
SIDES = ("pro", "anti")
COMPARED = ["logp_first", "logp_noun", "logp_cluster"]
TOLERANCE = 1e-4


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, round(time.perf_counter() - w, 2), round(time.process_time() - c, 2)


def naive_records(model, tokenizer, pairs: list[dict], max_new_tokens: int) -> list[dict]:
    """The per-pair numbers, one prompt and one plain forward / generate call at a time."""
    import torch

    from hetray.eval import metrics

    def split(prompt: str, continuation: str):
        enc = tokenizer(prompt + continuation, return_offsets_mapping=True)
        start = next(k for k, (a, b) in enumerate(enc["offset_mapping"]) if b > a and b > len(prompt))
        return enc["input_ids"], start

    out = []
    with torch.inference_mode():
        for pair in pairs:
            rec, nxt = {}, []
            for side in SIDES:
                prompt, cluster, referent = (pair[f"{k}_{side}"] for k in ("prompt", "cluster", "referent"))
                ids, start = split(prompt, cluster)
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
                token_logps = [logp[k - 1, ids[k]].item() for k in range(start, len(ids))]
                article, _ = metrics.referent_parts(referent)
                noun = len(split(prompt, article)[0]) - split(prompt, article)[1] if article else 0
                rec[f"logp_first_{side}"] = token_logps[0]
                rec[f"logp_noun_{side}"] = token_logps[noun]
                rec[f"logp_cluster_{side}"] = sum(token_logps)
                nxt.append(logp[start - 1])
                context = tokenizer(prompt.rstrip(" "), return_tensors="pt")
                gen = model.generate(**context, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(gen[0, context["input_ids"].shape[1]:], skip_special_tokens=True)
                rec[f"answer_{side}"] = metrics.answer_text(text)
                rec[f"correct_{side}"] = metrics.names_referent(text, referent)
            rec["kl"] = metrics.kl_divergence(nxt[0][None], nxt[1][None]).item()
            out.append(rec)
    return out


def compare(batched: list[dict], naive: list[dict]) -> dict:
    worst, answers_differ = 0.0, 0
    for b, n in zip(batched, naive):
        for key in [f"{k}_{s}" for k in COMPARED for s in SIDES] + ["kl"]:
            worst = max(worst, abs(b[key] - n[key]))
        answers_differ += sum(b[f"answer_{s}"] != n[f"answer_{s}"] for s in SIDES)
    return {"pairs": len(naive), "max_abs_diff": worst, "answers_differ": answers_differ}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(DATA), help="folder with the WinoBias dev files")
    p.add_argument("--limit", type=int, default=None, help="pairs per type for the batched run (default: all 396)")
    p.add_argument("--naive-limit", type=int, default=50, help="pairs per type for the naive loop")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: one per core)")
    p.add_argument("--out", default="bench_eval", help="results name under benchmarks/results/")
    args = p.parse_args()

    import torch

    from hetray.eval import winobias
    from hetray.eval.config import EvalConfig
    from hetray.eval.scoring import Scorer
    from hetray.eval.suites import SUITES

    load_before = round(os.getloadavg()[0], 2)
    scorer, load_s, _ = timed(lambda: Scorer.load(
        "smollm2-135m-instruct", batch_size=args.batch_size, device="cpu", threads=args.threads))
    cfg = EvalConfig(winobias={"path": args.data, "splits": ["dev"], "types": [1, 2], "limit": args.limit},
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    settings, suite = cfg.winobias, SUITES["winobias"]

    # the naive subset first: the first --naive-limit pairs of each type, batched then naive
    sub_settings = settings.model_copy(update={"limit": args.naive_limit})
    sub_pairs = winobias.load_pairs(sub_settings)
    sub_batched, sb_wall, sb_cpu = timed(lambda: winobias.score_pairs(
        scorer, sub_pairs, SIDES, args.max_new_tokens, settings.bias_token))
    naive, n_wall, n_cpu = timed(lambda: naive_records(scorer.model, scorer.tokenizer, sub_pairs, args.max_new_tokens))
    agreement = compare(sub_batched, naive)
    print(f"naive subset: {agreement}", flush=True)
    assert agreement["max_abs_diff"] <= TOLERANCE, agreement
    assert agreement["answers_differ"] == 0, agreement

    records, f_wall, f_cpu = timed(lambda: suite.score(scorer, suite.load(cfg, None), cfg))
    full = {"overall": suite.aggregate(records), "by_group": suite.by_group(records)}
    n_full = full["overall"]["pairs"]
    runs = {
        "naive_subset": {"pairs": len(sub_pairs), "wall_s": n_wall, "cpu_s": n_cpu},
        "batched_subset": {"pairs": len(sub_pairs), "wall_s": sb_wall, "cpu_s": sb_cpu},
        "batched_full": {"pairs": n_full, "wall_s": f_wall, "cpu_s": f_cpu},
    }
    for r in runs.values():
        r["pairs_per_s"] = round(r["pairs"] / r["wall_s"], 3)
        r["pairs_per_cpu_s"] = round(r["pairs"] / r["cpu_s"], 3)
    ratio = round(runs["batched_subset"]["pairs_per_s"] / runs["naive_subset"]["pairs_per_s"], 2)
    ratio_cpu = round(runs["batched_subset"]["pairs_per_cpu_s"] / runs["naive_subset"]["pairs_per_cpu_s"], 2)
    load_after = round(os.getloadavg()[0], 2)
    result = {
        "model": "smollm2-135m-instruct (fp32, cpu)", "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "bias_token": settings.bias_token,
        "limit_per_type": args.limit, "naive_limit_per_type": args.naive_limit, "model_load_s": load_s,
        "runs": runs, "speedup_wall": ratio, "speedup_cpu": ratio_cpu, "agreement": agreement,
        "load_average_1min_before": load_before, "load_average_1min_after": load_after,
        "metrics": {"overall": full["overall"], "by_group": full["by_group"]},
    }
    metric_rows = "\n".join(
        f"| {name} | {m['pairs']} | {m['bias']:.4f} | {m['bias_signed']:+.4f} | {m['bias_cluster']:.4f} "
        f"| {m['bias_entropy']:.4f} | {m['accuracy']:.4f} ({m['accuracy_pro']:.3f} / {m['accuracy_anti']:.3f}) "
        f"| {m['similarity']:.4f} | {m['irregular_pairs']} |"
        for name, m in [("overall", full["overall"]), *full["by_group"].items()])
    run_rows = "\n".join(
        f"| {name} | {r['pairs']} | {r['wall_s']} | {r['pairs_per_s']} | {r['cpu_s']} | {r['pairs_per_cpu_s']} |"
        for name, r in runs.items())
    md = (
        f"WinoBias dev ({args.data}), SmolLM2-135M-Instruct fp32 on CPU, {torch.get_num_threads()} torch threads, "
        f"batch size {args.batch_size}, at most {args.max_new_tokens} new tokens, Bias on the "
        f"'{settings.bias_token}' token. Load average (1 min) {load_before} before, {load_after} after: "
        "the machine's 2 cores are shared, so wall times are noisy; CPU s is the work done.\n\n"
        "## Metrics of the base model (all of the batched run)\n\n"
        "| group | pairs | Bias | Bias signed (pro - anti) | Bias (Cluster) | Bias (Entropy) KL(pro‖anti) "
        "| Accuracy (pro / anti) | Similarity | irregular pairs |\n|---|---|---|---|---|---|---|---|---|\n"
        f"{metric_rows}\n\n"
        "## Speed\n\n"
        "| run | pairs | wall s | pairs/s | CPU s | pairs per CPU s |\n|---|---|---|---|---|---|\n"
        f"{run_rows}\n\n"
        f"Batched vs naive on the same {len(sub_pairs)} pairs (the first {args.naive_limit} of each type): "
        f"**{ratio}x** pairs/s (wall), {ratio_cpu}x per CPU second. The naive loop ran on that subset only "
        f"(one prompt at a time over all {n_full} pairs would take about "
        f"{round(n_full / runs['naive_subset']['pairs_per_s'] / 60)} min here). Agreement on the subset: "
        f"max |batched - naive| over logp_first, logp_noun, logp_cluster (both sides) and KL = "
        f"{agreement['max_abs_diff']:.2e} (asserted <= {TOLERANCE}); answers that differ: "
        f"{agreement['answers_differ']} of {2 * len(sub_pairs)}. The batched run stops a batch's generation "
        f"once every answer in it is complete; the naive loop generates all {args.max_new_tokens} tokens (the "
        f"answers are the same). Model load {load_s} s, not in any run."
    )
    path = write_results(args.out, result, md)
    print(md)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
