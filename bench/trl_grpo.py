"""TRL's GRPOTrainer with two reward models, as a user would set it up, timed iteration by iteration for
bench/trl_compare.py. Runs in TRL's own environment (bench/.venv-trl, which the project never imports):

    bench/.venv-trl/bin/python -m torch.distributed.run --standalone --nproc_per_node=1 bench/trl_grpo.py \\
        --model runs/real/smollm2 --reward-models runs/real/rm_help/model,runs/real/rm_safe/model

One iteration = one generation batch (--prompts x --generations sequences, every answer exactly --new-tokens long,
every prompt exactly --prompt-len tokens) and the optimizer steps on it in minibatches of --minibatch sequences
(GRPO's per_device_train_batch_size x processes; steps_per_generation = sequences / minibatch). Before each
iteration rank 0 waits for a line on stdin (the controller alternates this process with the project's); after it,
rank 0 prints `ROUND {"generation": s, "scoring": s, "update": s, "iteration": s}`: generation is TRL's
`_generate`, scoring the rest of `_generate_and_score_completions` (both reward models, the reference model's
log-probs), update every `training_step` of the iteration without them.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import transformers
import trl
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--reward-models", required=True, help="two reward-model folders, comma separated")
p.add_argument("--prompts", type=int, default=4, help="prompts per iteration (all processes)")
p.add_argument("--generations", type=int, default=2, help="answers per prompt (GRPO's group)")
p.add_argument("--minibatch", type=int, default=4, help="sequences per optimizer step (all processes)")
p.add_argument("--prompt-len", type=int, default=16)
p.add_argument("--new-tokens", type=int, default=16)
p.add_argument("--rounds", type=int, default=4, help="iterations (the controller counts the first as a warm-up)")
p.add_argument("--beta", type=float, default=0.04)
a = p.parse_args()
torch.set_num_threads(1)
world = int(os.environ.get("WORLD_SIZE", "1"))
sequences = a.prompts * a.generations
tok = AutoTokenizer.from_pretrained(a.model)

# prompts of exactly --prompt-len tokens: common words, each its own token, until the prompt has that many
words = [w for w in (" the", " a", " of", " and", " to", " in", " is", " you", " that", " it", " for", " on", " with",
                     " as", " was", " at", " by", " this", " from", " or", " have", " be", " are", " not", " can")
         if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
rng = torch.Generator().manual_seed(0)
prompts = []
while len(prompts) < a.prompts * (a.rounds + 1):
    text = "Tell me"
    while len(tok(text, add_special_tokens=False)["input_ids"]) < a.prompt_len:
        text += words[int(torch.randint(len(words), (1,), generator=rng))]
    if len(tok(text, add_special_tokens=False)["input_ids"]) == a.prompt_len:
        prompts.append(text)

config = GRPOConfig(
    output_dir="/tmp/trl_grpo_bench", report_to="none", save_strategy="no", logging_steps=10_000, seed=0,
    per_device_train_batch_size=a.minibatch // world, steps_per_generation=sequences // a.minibatch,
    num_generations=a.generations, max_completion_length=a.new_tokens,
    generation_kwargs={"min_new_tokens": a.new_tokens}, beta=a.beta, num_iterations=1, learning_rate=1e-6,
    max_steps=(sequences // a.minibatch) * a.rounds, use_cpu=not torch.cuda.is_available(), bf16=False,
    dataloader_num_workers=0, disable_tqdm=True, temperature=1.0, top_k=0, top_p=1.0)
trainer = GRPOTrainer(model=a.model, reward_funcs=a.reward_models.split(","), args=config,
                      train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok)
rank0 = trainer.accelerator.is_main_process

clock = {"generation": 0.0, "generate_and_score": 0.0, "steps": 0.0}


def timed(key, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock[key] += time.perf_counter() - t0
    return wrapper


trainer._generate = timed("generation", trainer._generate)
trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
trainer.training_step = timed("steps", trainer.training_step)


class Rounds(TrainerCallback):
    """Wait for the controller before each iteration; report it after."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step % config.steps_per_generation == 0:
            if rank0:
                if not sys.stdin.readline():
                    raise SystemExit("the controller closed stdin")
            if dist.is_initialized():
                dist.barrier()
            for k in clock:
                clock[k] = 0.0
            clock["t0"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % config.steps_per_generation == 0 and rank0:
            gen, gen_score, steps = clock["generation"], clock["generate_and_score"], clock["steps"]
            print("ROUND " + json.dumps({"generation": gen, "scoring": gen_score - gen, "update": steps - gen_score,
                                         "iteration": time.perf_counter() - clock["t0"]}), flush=True)


trainer.add_callback(Rounds())
if rank0:
    print("READY " + json.dumps({"trl": trl.__version__, "transformers": transformers.__version__,
                                 "torch": torch.__version__, "world_size": world, "sequences": sequences,
                                 "minibatch": a.minibatch, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                                 "beta": a.beta}), flush=True)
trainer.train()
