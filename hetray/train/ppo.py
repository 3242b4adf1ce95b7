"""Stage 5c, PPO: RLHF from the SFT model against the reward model (paper 2.6, A.3).

``run_ppo(cfg)`` samples completions (``min_new_tokens``..``max_new_tokens``, paper 32-128, at
``temperature``) for the prompts of the pairs, in ``train.text_format``'s text (as SFT and the
reward model read it), scores them with the reward stage's merged model, and trains LoRA on
the policy with TRL's PPOTrainer (``trl.experimental.ppo``, the last release that has it). The
value model starts as a copy of the reward model; the reference policy is the SFT model, i.e.
the policy with its adapter switched off (``ref_model=None`` with PEFT). The history has the
PPO reward (``objective/scores``), KL (``objective/kl``) and the KL coefficient that update
used (``objective/kl_coef``) per update.

Budget. A step is one PPO update: a rollout of ``per_device_batch_size x
gradient_accumulation_steps x workers`` prompts (episodes), scored, then ``num_ppo_epochs``
optimisation passes over it. ``max_steps`` counts updates; an epoch (``num_train_epochs``) is
one pass over the distinct prompts, i.e. ``ceil(prompts / rollout)`` updates; the smaller
budget wins. The paper's "20000 steps" are StackLLaMA's ``PPOConfig(steps=20000)``, which the
old TRL counted in episodes: ``ceil(20000 / batch_size 32) = 625`` updates of 32 prompts. Here
that is a rollout of 32 (``per_device_batch_size: 1``, ``gradient_accumulation_steps: 32`` on
one worker, or 4 on eight) and ``max_steps: 625``; with the default rollout of 4 per worker,
20000 episodes are ``20000 / (4 x workers)`` updates.

KL. ``kl_coef`` weighs the per-token KL penalty against the SFT model. With ``kl_target`` set,
the coefficient adapts after every update as the old TRL's AdaptiveKLController (Ziegler et
al. 2019) did, which StackLLaMA used (``kl_coef: 0.2``, ``kl_target: 6``, ``kl_horizon:
10000``): ``coef *= 1 + clip(kl / kl_target - 1, -0.2, 0.2) x episodes / kl_horizon``
(``adaptive_kl_coef``). TRL 1.12's PPOTrainer has only a fixed coefficient, but it reads
``args.kl_coef`` afresh in every update, so ``KLCoefficient`` (a callback on the log of each
update) sets the next update's coefficient there. Generation differs from StackLLaMA in one
way: it sampled one length per batch in [32, 128) and never stopped at EOS; here a completion
is at least ``min_new_tokens`` long and stops at EOS or ``max_new_tokens`` (set both equal for
a fixed length).

TRL's PPOTrainer ties the rollout to the batch: each update generates
``per_device_batch_size x gradient_accumulation_steps x workers`` completions. Its ``train()``
takes no checkpoint, so resuming after a failure is done here: the policy, value model,
optimizer, scheduler and KL coefficient come back from the last checkpoint and only the
remaining updates run.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

from hetray.models import CAUSAL, SEQ_CLS, load_model, load_tokenizer
from hetray.pairs import prompt_rows, text_format
from hetray.train.driver import STAGE_MODEL_DIR, StageJob, train_stage
from hetray.train.worker import lora_config, plan_budget, short_prompts, trl_config, world_size

VALUE_FILE = "value_model.safetensors"


def run_ppo(cfg, force: bool = False) -> dict:
    """Train (or skip, when up to date) the PPO policy. Returns its manifest."""
    run_dir = Path(cfg.run_dir).resolve()
    return train_stage(
        cfg, "ppo", cfg.train.ppo, model=str(run_dir / "sft" / STAGE_MODEL_DIR), head=CAUSAL,
        build_trainer=build_trainer, upstream=("sft", "reward"),
        extra={"reward_model": str(run_dir / "reward" / STAGE_MODEL_DIR)},
        train=train, save=save_policy, force=force,
    )


def build_trainer(job: StageJob):
    """In each Ray Train worker: TRL's PPOTrainer with policy, reference (adapter off), reward, value."""
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = job.settings
    tokenizer = load_tokenizer(job.model)
    tokenizer.padding_side = "left"  # prompts are left-padded so generation continues them
    fmt = text_format(tokenizer, job.text_format, job.raw_template)
    rows = short_prompts(prompt_rows(job.data_dir, fmt), tokenizer, s.max_length)
    rollout = s.per_device_batch_size * s.gradient_accumulation_steps * world_size()  # episodes per update
    budget = plan_budget(s.max_steps, s.num_train_epochs, rows=len(rows), rows_per_step=rollout)
    args = trl_config(
        PPOConfig, job,
        total_episodes=budget.max_steps * rollout,  # PPO's updates: ceil(total_episodes / rollout)
        response_length=s.max_new_tokens,
        stop_token="eos",
        num_ppo_epochs=s.num_ppo_epochs,
        num_mini_batches=s.num_mini_batches,
        kl_coef=s.kl_coef,
        temperature=s.temperature,
        num_sample_generations=0,
    )
    policy = load_model(job.model, CAUSAL)
    policy.generation_config.min_new_tokens = s.min_new_tokens  # merged into PPO's generation config
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=load_model(job.extra["reward_model"], SEQ_CLS),
        value_model=load_model(job.extra["reward_model"], SEQ_CLS),
        train_dataset=Dataset.from_list([_tokenize(r["prompt"], tokenizer) for r in rows]),
        peft_config=lora_config(s.lora, CAUSAL),
    )
    _expose_parts(trainer)
    # PPOTrainer skips Trainer.__init__, and transformers 5 reads this in save_model on
    # every rank but the main one.
    trainer.is_distributed_loading_by_transformers = False
    trainer.add_callback(SaveValueModel())
    trainer.add_callback(KLCoefficient(s.kl_target, s.kl_horizon))
    trainer.budget = budget
    return trainer


def adaptive_kl_coef(coef: float, kl: float, target: float, horizon: float, episodes: int) -> float:
    """The KL coefficient after an update whose rollout of ``episodes`` completions had mean
    KL ``kl`` (Ziegler et al. 2019; the old TRL's AdaptiveKLController): the proportional
    error ``kl / target - 1``, clipped to +-0.2, moves it by ``error x episodes / horizon``."""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return coef * (1 + error * episodes / horizon)


class KLCoefficient(TrainerCallback):
    """Logs the KL coefficient each PPO update used (``objective/kl_coef``) and, with a
    ``target``, adapts it for the next update.

    TRL's ``PPOTrainer.train`` computes every update's rewards as ``score - args.kl_coef x KL``,
    reading ``args.kl_coef`` then, and logs each update (``Trainer.log``: appended to the
    history, then ``on_log`` with the same ``args`` object) before the next rollout. So the
    coefficient set here is the next update's. The logged KL is already averaged over the
    workers, so every rank computes the same coefficient.
    """

    def __init__(self, target: float | None, horizon: float):
        self.target, self.horizon = target, horizon

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "objective/kl" not in logs:
            return
        used = args.kl_coef
        logs["objective/kl_coef"] = used  # what RayReport (added after this callback) reports
        if state.log_history and state.log_history[-1].get("objective/kl") == logs["objective/kl"]:
            state.log_history[-1]["objective/kl_coef"] = used  # the entry Trainer.log just appended
        args.kl_coef = self.next(used, logs["objective/kl"], args.batch_size)

    def next(self, coef: float, kl: float, episodes: int) -> float:
        return coef if self.target is None else adaptive_kl_coef(coef, kl, self.target, self.horizon, episodes)

    def resume(self, args, history: list[dict]) -> None:
        """The coefficient after the checkpoint's last update, from the restored history."""
        logged = [h for h in history if "objective/kl_coef" in h and "objective/kl" in h]
        if logged:
            args.kl_coef = self.next(logged[-1]["objective/kl_coef"], logged[-1]["objective/kl"], args.batch_size)


def _expose_parts(trainer) -> None:
    """TRL's PPO reads ``model.policy`` (and ``.config``) on the wrapped model, which DDP does
    not forward (huggingface/trl#2375, still open in 1.12): let the DDP wrapper forward them."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    class ForwardingDDP(DDP):
        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.module, name)

    if type(trainer.model) is DDP:
        trainer.model.__class__ = ForwardingDDP


def _tokenize(prompt, tokenizer) -> dict:
    if isinstance(prompt, list):
        return {"input_ids": tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"]}
    return {"input_ids": tokenizer(prompt)["input_ids"]}


def _unwrapped(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def save_policy(trainer, folder: str) -> None:
    """The policy's LoRA adapter (the trainer's model also holds the value model)."""
    if trainer.accelerator.is_main_process:
        _unwrapped(trainer).policy.save_pretrained(folder)


def train(trainer, checkpoint_dir: str | None) -> None:
    """PPO's train(), resumed by hand: restore weights, optimizer, scheduler and history from
    the checkpoint, run only the remaining updates, and keep counting steps from there."""
    if checkpoint_dir is None:
        trainer.train()
        return
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = Path(checkpoint_dir)
    state = json.loads((ckpt / "trainer_state.json").read_text())
    done = state["global_step"]
    parts = _unwrapped(trainer)
    set_peft_model_state_dict(parts.policy, load_file(ckpt / "adapter_model.safetensors"))
    parts.value_model.load_state_dict(load_file(ckpt / VALUE_FILE))
    # weights_only: the checkpoint lives on shared storage, and a full unpickle would run any
    # code a tampered file names; Trainer's own state dicts are tensors, numbers and lists
    trainer.optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    trainer.lr_scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
    total = trainer.args.num_total_batches
    trainer.args.num_total_batches = max(0, total - done)  # the loop runs only the rest
    history = state.get("log_history", [])
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, KLCoefficient):
            callback.resume(trainer.args, history)
    trainer.add_callback(Resume(done, total, history))
    trainer.train()


class SaveValueModel(TrainerCallback):
    """PPO checkpoints hold only the policy's adapter; add the value model, for resuming."""

    def on_save(self, args, state, control, model=None, **kwargs):
        from safetensors.torch import save_file

        if state.is_world_process_zero:
            value = model.value_model  # the callback gets the unwrapped PolicyAndValueWrapper
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            save_file({k: v.contiguous() for k, v in value.state_dict().items()}, folder / VALUE_FILE)


class Resume(TrainerCallback):
    """PPO's train() starts its state at step 0; this puts it back where the checkpoint was,
    so logs, checkpoints and reports go on counting from there."""

    def __init__(self, step: int, max_steps: int, history: list):
        self.step, self.max_steps, self.history = step, max_steps, history

    def on_train_begin(self, args, state, control, **kwargs):
        state.global_step, state.max_steps = self.step, self.max_steps
        state.episode = self.step * args.batch_size
        state.log_history = list(self.history)
