"""The bookkeeping of a long run, kept out of the algorithm's way: what the numbered scripts call once per step
of bookkeeping, beside common.py's math, models, data and rollouts.

  arguments   one dataclass per script (defaults = the paper's values), parsed by transformers' HfArgumentParser;
              a field's rule rides on its type and is checked before anything loads
  checks      model folders, prompt formats, checksums and data counts, each refused with the fix in its message
  dry run     one iteration that saves nothing and says what the run will take
  metrics     metrics.jsonl, samples, TensorBoard (W&B on request), the run summary
  checkpoints sharded (torch.distributed.checkpoint), atomic, verified, resumed only under the same arguments and
              inputs; one writer per run folder (a lock)
  stops       preemption and Ctrl-C finish the iteration and checkpoint; the non-finite guard skips a bad step and
              never lets a NaN reach saved weights

No equation of the paper lives here.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import torch
import torch.distributed as dist

from common import (
    PROMPT_TEMPLATES, 
    DistInfo, PROMPT_MIX, _local, Rollouts, SKIPPED_ROWS, SOURCES, _AT_TEARDOWN, _library_warnings_off, _local_files,
    _prompt_ids, amtl_align_sharded, auto_tokenizer, check_same_vocab, condition_number, decoder_layers,
    full_state_dict, full_value, gather_rows, objective_gradients, print0, read_json, read_jsonl, set_flat_grad,
    special_prefix, teardown,
)


# ---- 0. files written whole, and checks of model folders, prompt formats and prompt counts
def write_whole(path: Path, data: str | bytes) -> None:
    """Write a file whole or not at all: a temporary file beside it, fsync, then a rename over it (and an fsync of the
    folder). A failed write (a full or read-only disk) leaves the previous file as it was, and says which file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"could not write {path} ({type(e).__name__}: {e}); is the disk full or read-only? "
                         + (f"The previous {path.name} is intact. " if path.exists() else "")
                         + "Free space or fix the mount, then run the same command again.") from None


def count_cut_prompts(tokenizer, prompts: list[str], budget: int, what: str, template: str) -> int:
    """Log, like skipped rows, how many prompts must be cut to fit budget tokens (once, before training); a budget
    the template fills by itself (no room for the user's text) stops the run, naming --max-prompt-len."""
    pre = len(special_prefix(tokenizer, template))
    own = len(_prompt_ids(tokenizer, "", template))               # the template's tokens, around an empty text
    if budget - pre - own < 8:
        fail(f"--max-prompt-len {budget} leaves {max(0, budget - pre - own)} tokens for the user's text: the prompt "
             f"template ({template}) takes {own + pre} by itself. Give --max-prompt-len {pre + own + 64} or more")
    n = sum(len(_prompt_ids(tokenizer, p, template)) > budget - pre for p in prompts)
    if n:
        SKIPPED_ROWS[f"{what} (cut to fit)"] = {f"longer than {budget} tokens": n}
        print0(f"[data] {what}: {n} of {len(prompts)} prompts are longer than {budget} tokens (--max-prompt-len) and "
               f"cut to fit: the start of the user's text is dropped, the template is kept")
    return n


MODEL_KINDS = {"causal_lm": "ForCausalLM", "sequence_classifier": "ForSequenceClassification",
               "token_classifier": "ForTokenClassification"}


def check_model_folder(path: str, what: str, kind: str | None = None) -> None:
    """Before anything is loaded: a local path must be a model folder of the expected kind with readable weights.

    path: a folder, or a hub id ("org/name", left to from_pretrained). kind: a key of MODEL_KINDS, or None for
    any model (a backbone). Exits with a message naming the flag's value and the fix.
    """
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.exists() and not path.startswith(("/", ".", "~")) and path.count("/") == 1:
        return                                                    # a hub id: from_pretrained fetches it
    if not p.is_dir():
        raise SystemExit(f"{what} {path}: no such folder" + (" (it is a file; give the folder that holds it)" if p.exists() else ""))
    if not (p / "config.json").exists():
        raise SystemExit(f"{what} {path} is not a model folder: no config.json (a save_pretrained folder is expected)")
    cfg = read_json(p / "config.json")
    archs = cfg.get("architectures") or []
    # a ScoreModel's folder names its head (its architectures name a backbone where transformers has no head class)
    found = {"reward": "sequence_classifier", "critic": "token_classifier"}.get(cfg.get("molma_score_head")) or next(
        (k for k, suffix in MODEL_KINDS.items() if archs and archs[0].endswith(suffix)), "other")
    if kind and archs and found != kind:
        raise SystemExit(f"{what} {path} holds a {archs[0]} ({found.replace('_', ' ')}); a {kind.replace('_', ' ')} "
                         f"(*{MODEL_KINDS[kind]}) is expected here")
    files = sorted(p.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{what} {path} has no *.safetensors weights (only safetensors are loaded, never pickles)")
    head_rows = None
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:   # checks the header and that the file covers every tensor
                if "score.weight" in st.keys():
                    head_rows = st.get_slice("score.weight").get_shape()[0]
        except Exception as e:
            raise SystemExit(f"{what}: cannot read {f}: {e}. The file is damaged or truncated; write or copy it again")
    labels = cfg.get("id2label") or {}
    if kind == "sequence_classifier" and head_rows is not None and labels and head_rows != len(labels):
        raise SystemExit(f"{what} {path}: its config.json names {len(labels)} objectives ({', '.join(labels.values())}) "
                         f"but its score head has {head_rows} output(s): the config and the weights come from different "
                         f"models. Put the folder's own config.json back, or train the reward model again")
    check_weights_checksum(p, what)


def check_weights_checksum(folder: Path, what: str) -> None:
    """A folder this project wrote records its weights' sha256 in config.json (write_pretrained): compare, once per
    node (LOCAL_RANK 0, or a plain process), and stop naming the file if it changed. A folder from elsewhere records
    none and is not checked."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    recorded = read_json(folder / "config.json").get("molma_weights_sha256") or {}
    if recorded and not all((folder / n).exists() for n in recorded) and list(folder.glob("*.safetensors.index.json")):
        print0(f"[check] {what}: {folder} was saved again in shards (model.safetensors.index.json) since this project "
               f"wrote it, so the weights checksum config.json records does not apply to its files: not checked")
        return
    for name, want in recorded.items():
        f = folder / name
        if not f.exists():
            raise SystemExit(f"{what}: {f} is missing, though {folder / 'config.json'} records its checksum; copy the "
                             f"folder again")
        if _sha256(f) != want:
            raise SystemExit(f"{what}: {f} does not match the sha256 recorded in {folder / 'config.json'} when it was "
                             f"written: the file was damaged or changed since (a bad copy, a disk error, an edit). "
                             f"Copy or write it again; if you changed the weights on purpose, delete "
                             f"molma_weights_sha256 from config.json")


def check_can_build(path: str, what: str, needs: tuple[str, ...] = ("causal_lm", "backbone")) -> None:
    """Before any weights load, from config.json alone: transformers builds the models a stage makes from path, and
    FSDP finds their decoder layers. needs: "causal_lm" (pi_0, the policy), "backbone" (a ScoreModel: reward model,
    critic). Builds each on the meta device (no memory, a second); a hub id is checked when it loads."""
    import transformers

    if not (Path(path) / "config.json").exists():
        return
    with _library_warnings_off():
        config = transformers.AutoConfig.from_pretrained(path)
    arch = f"{(config.architectures or ['?'])[0]} (model_type {config.model_type!r})"
    for need in needs:
        auto = transformers.AutoModelForCausalLM if need == "causal_lm" else transformers.AutoModel
        try:
            with torch.device("meta"), _library_warnings_off():
                model = auto.from_config(config)
        except (ValueError, KeyError) as e:
            raise SystemExit(f"{what} {path}: this project cannot train a {arch}: transformers has no "
                             f"{auto.__name__} for it ({str(e).splitlines()[0][:160]}). Every stage needs a decoder-only "
                             f"model that loads as AutoModelForCausalLM (and its backbone as AutoModel)") from None
        if need == "backbone" and not hasattr(config, "hidden_size"):
            raise SystemExit(f"{what} {path}: a {arch}'s config has no hidden_size, the width of the reward and value "
                             f"heads this project puts on its backbone")
        decoder_layers(model, f"{what} {path}: a {arch}")


def recorded_prompt_format(path: str) -> str | None:
    """The --prompt-template a folder this project wrote was trained with (config.json's molma_prompt_format)."""
    cfg = Path(path) / "config.json"
    return read_json(cfg).get("molma_prompt_format") if cfg.exists() else None


def check_recorded_format(path: str, template: str, flag: str) -> None:
    """A folder trained in another prompt format than this run's is refused (one that records none is not)."""
    fmt = recorded_prompt_format(path)
    if fmt is not None and fmt != template:
        raise SystemExit(f"{flag} {path} was trained with --prompt-template {fmt}, this run uses {template}: run "
                         f"with --prompt-template {fmt}, or train that model again with {template}")


def check_formats_match(paths: list[str], policy: str, template: str, flag: str = "--reward-models") -> None:
    """Before any weights load: every reward model (or trained policy) was trained in this run's prompt format, and
    reads the policy's token ids with the same tokenizer (and, for chat, the same chat template). A reward model
    trained on "[INST] ... [/INST]" text would otherwise score "Instruct: ... Output:" text without a word."""
    local = [p for p in paths if (Path(p) / "config.json").exists()]            # a hub id: checked when it loads
    if not local or not (Path(policy) / "config.json").exists():
        return
    ours = auto_tokenizer(policy)
    for path in local:
        check_recorded_format(path, template, flag)
        if not (Path(path) / "tokenizer_config.json").exists():
            continue                                   # no tokenizer saved beside it: load_reward_heads checks its vocab
        theirs = check_same_vocab(ours, path, f"{flag} {path}")
        if template == "chat" and getattr(theirs, "chat_template", None) != getattr(ours, "chat_template", None):
            raise SystemExit(f"{flag} {path} was trained with another chat template than --policy {policy}'s: both must "
                             f"render prompts alike (train it again from the policy's folder)")


def check_prompt_count(n_prompts: int, n: int, flag: str) -> None:
    """Before the models load: an iteration takes n prompts from the data, so there must be n at least."""
    if n_prompts < n:
        fail(f"{n_prompts} training prompts cannot fill one iteration of {flag} {n}: lower {flag} to {n_prompts} "
             f"or less, or add prompts to the data")





# ---- the tokenizer, checked for the prompt format every stage uses
def check_chat_template(tokenizer, path: str) -> None:
    """--prompt-template chat needs a chat template that renders the user's turn and ends with the generation prompt
    (the assistant's header): without it the policy would be asked to continue the user's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise SystemExit(f"--prompt-template chat: the tokenizer at {path} has no chat template (no chat_template in "
                         f"tokenizer_config.json, no chat_template.jinja); choose phi2, llama2_chat or plain, or give "
                         f"the folder of an instruct model")
    probe = "MOLMA-PROBE-7319"
    try:
        turn = [{"role": "user", "content": probe}]
        with_prompt = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
        without = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=False)
    except Exception as e:       # a template error names only jinja's line
        raise SystemExit(f"--prompt-template chat: the chat template of {path} cannot render one user turn: "
                         f"{type(e).__name__}: {e}") from None
    if probe not in with_prompt:
        raise SystemExit(f"--prompt-template chat: the chat template of {path} drops the user's message")
    end = with_prompt.rstrip()
    # the answer's opening must follow the user's turn: refused when the text ends on the user's words or on the end
    # token, or when a template that reads add_generation_prompt adds nothing for it (Llama 2's template reads no
    # flag: its " [/INST]" opens the answer)
    if end.endswith(probe) or (tokenizer.eos_token and end.endswith(tokenizer.eos_token)) or (
            with_prompt == without and "add_generation_prompt" in tokenizer.chat_template):
        raise SystemExit(f"--prompt-template chat: the chat template of {path} ignores add_generation_prompt (it adds "
                         f"no assistant header after the user's turn), so the model would continue the user's text; "
                         f"fix the template, or choose phi2, llama2_chat or plain")


def load_tokenizer(path: str, template: str = "phi2"):
    """The policy's tokenizer, checked for the prompt format every stage uses (template: --prompt-template, which
    the stages then hand to every function that writes a prompt).

    phi-2's tokenizer has no pad token: pad with eos, and take every mask from lengths. A tokenizer that has
    its own pad token keeps it; nothing here relies on pad == eos or on pad != eos.
    """
    if template not in PROMPT_TEMPLATES:
        raise SystemExit(f"--prompt-template {template!r} is not one of {', '.join(PROMPT_TEMPLATES)}")
    tok = auto_tokenizer(path)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no eos token; MOLMA needs one to end answers")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if template == "chat":
        check_chat_template(tok, path)
    elif getattr(tok, "chat_template", None):
        print0(f"[format] the tokenizer at {path} has its own chat template, and --prompt-template is {template}: an "
               f"instruct model usually answers coherently only in its own format (--prompt-template chat)")
    quiet_transformers()
    return tok


def quiet_transformers() -> None:
    """The console says what happens once: no per-file "Loading weights" bars (our loaders print one line per
    model), and one copy of the libraries' warnings, from rank 0. Every stage loads its tokenizer first."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if dist.is_initialized() and dist.get_rank() != 0:
        transformers.logging.set_verbosity_error()


# ---- 1. arguments: one dataclass per script, each field documented, defaults = the paper's values; parsed by
# transformers' HfArgumentParser. A field's rule rides on its type (`lr: Positive[float]`), checked in __post_init__.
_T = TypeVar("_T")
Positive = Annotated[_T, "positive"]            # > 0
NonNegative = Annotated[_T, "nonneg"]          # >= 0
Unit = Annotated[_T, "unit"]                   # in [0, 1]
Beta = Annotated[_T, "beta"]                   # in [0, 1), an Adam beta
CHECKS = {   # what a rule's value must satisfy: rule -> (test, what the message says)
    "positive": (lambda v: v > 0, "must be positive"),
    "nonneg": (lambda v: v >= 0, "must be zero or positive"),
    "unit": (lambda v: 0 <= v <= 1, "must lie in [0, 1]"),
    "beta": (lambda v: 0 <= v < 1, "must lie in [0, 1)"),
}


def arg(default, help: str):
    """A dataclass field with its --help text (HfArgumentParser passes metadata to argparse, which reads % as a
    format: a literal one is escaped here)."""
    meta = {"help": help.replace("%", "%%")}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class CheckedArgs:
    """Base of every script's arguments: refuse nonsense before anything runs, however the dataclass is made (from
    the command line or in code). Every float must be finite, and every field whose type carries a rule must pass
    it. The message names the flag, so a typo costs seconds, not an 18-hour run."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):
            v, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if isinstance(v, float) and not math.isfinite(v):
                raise SystemExit(f"{flag} must be a finite number, got {v}")
            rule = next(iter(getattr(hints[f.name], "__metadata__", ())), None)
            if rule and isinstance(v, (int, float)) and not isinstance(v, bool) and not CHECKS[rule][0](v):
                raise SystemExit(f"{flag} {CHECKS[rule][1]}, got {v}")


def yes_no(text: str) -> bool:
    """A yes/no flag's value as HfArgumentParser takes it: true/false, yes/no, 1/0, t/f, y/n, any case; a typo's
    message says what is accepted."""
    v = text.strip().lower()
    if v in ("true", "yes", "1", "t", "y"):
        return True
    if v in ("false", "no", "0", "f", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false (also yes/no, 1/0), got {text!r}")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows a default once: not when it is empty, nor when the help text already says it."""

    def _get_help_string(self, action):
        if action.default in ("", None) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parse_args(cls, argv=None, presets: dict[str, dict] | None = None):
    """HfArgumentParser over one dataclass; `--preset NAME` swaps in another set of defaults.

    Explicit flags always win over the preset. Yes/no flags: a bare `--flag` means true, or give true/false,
    yes/no, 1/0 in any case (`--no-flag` for one that defaults to true); anything else is an error naming the
    flag, as is an unknown flag. --help lists each flag by its dashed name (HfArgumentParser's underscored
    spelling is accepted too) with its default once, the preset's when one is given.
    """
    from transformers import HfArgumentParser
    from transformers.hf_argparser import string_to_bool

    presets = presets or {}
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset is not None and known.preset not in presets:
        raise SystemExit(f"unknown --preset {known.preset!r}; accepted: {', '.join(presets) or 'none'}")
    preset = dataclasses.make_dataclass("Preset", [("preset", str, dataclasses.field(default=None, metadata=dict(
        choices=list(presets), help="a named set of defaults: " + "; ".join(
            f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in presets.items()))))])
    parser = HfArgumentParser([preset, cls] if presets else [cls], description=(cls.__doc__ or "").strip(),
                              formatter_class=_Defaults)
    parser.set_defaults(**presets.get(known.preset, {}))
    for action in parser._actions:     # one name in --help and in messages: the dashed one
        action.option_strings = [s for s in action.option_strings if "_" not in s] or action.option_strings
        if action.type is string_to_bool:           # HfArgumentParser's yes/no type, with our message
            action.type, action.metavar = yes_no, "true|false"
        elif action.const is False:       # --no-flag, the complement of a true default
            action.help, action.default = f"the same as --{action.dest.replace('_', '-')} false", argparse.SUPPRESS
    ns = vars(parser.parse_args(argv))
    ns.pop("preset", None)
    args = cls(**ns)
    args.preset = known.preset
    return args


@dataclass
class RLArgs(CheckedArgs):
    """APA training of a policy from pi_0 against reward models (MOLMA Sec. 3.3, 4.3)."""
    policy: str = arg("microsoft/phi-2", "pi_0: the reference model; the policy and the critic start from it")
    reward_models: str = arg("runs/paper/rm_help/model,runs/paper/rm_safe/model",
                             "comma list of reward-model folders (stage 1); each objective is read from the "
                             "output that the folder's config.id2label names after it")
    data_root: str = arg("", "local copies of the datasets in their hub schemas; empty: read the hub")
    prompt_template: str = arg("phi2", "prompt format, the same in every stage: phi2 (Instruct/Output, the paper), "
                                       "llama2_chat ([INST] ... [/INST], Figure 5's Llama-2), plain, or chat (the "
                                       "tokenizer's own chat template: an instruct model's format)")
    out: str = arg("", "run folder (default: runs/paper/<method>; with --preset tiny, runs/tiny/<method>)")
    iterations: Positive[int] = arg(100, "APA iterations (Sec. 4.3)")
    rollouts: Positive[int] = arg(64, "prompts answered per iteration, the experience memory (Sec. 4.3); a total over all "
                                      "ranks, split evenly")
    minibatch: Positive[int] = arg(8, "rollouts per gradient step, a total over all ranks; one step per minibatch (Sec. 4.3)")
    lr: Positive[float] = arg(1e-6, "policy learning rate, constant (Sec. 4.3)")
    critic_lr: Positive[float] = arg(1e-6, "critic learning rate, constant")
    beta1: Beta[float] = arg(0.9, "AdamW beta1")
    beta2: Beta[float] = arg(0.95, "AdamW beta2")
    adam_eps: Positive[float] = arg(1e-5, "AdamW eps")
    weight_decay: NonNegative[float] = arg(0.1, "AdamW weight decay (Sec. 4.3)")
    grad_clip: Positive[float] = arg(1.0, "gradient clipping of the (aligned) policy update and of the critic")
    kl_beta: NonNegative[float] = arg(0.01, "beta of the per-token KL penalty, Eq. 3.3 (the paper's 0.01; the APA authors' "
                                            "trainer sets this penalty to 0)")
    apa_lambda: Positive[float] = arg(0.95, "lambda of the APA loss, Eq. 3.5")
    gamma: Unit[float] = arg(1.0, "GAE discount")
    gae_lambda: Unit[float] = arg(0.95, "GAE lambda")
    max_prompt_len: Positive[int] = arg(256, "prompt tokens kept (from the end)")
    max_new_tokens: Positive[int] = arg(256, "answer length limit")
    temperature: Positive[float] = arg(1.0, "sampling temperature (no top-k / top-p: the policy's own distribution)")
    precision: str = arg("auto", "auto: bf16 compute with fp32 weights and gradient reduction on GPU, fp32 on CPU; "
                                 "or bf16 / fp32 anywhere")
    whiten_advantages: bool = arg(False, "whiten the GAE advantages per objective once per iteration over the batch's "
                                         "valid tokens (all ranks) before Eq. 3.5, for the policy loss only (as TRL's "
                                         "PPOTrainer, once per batch, masked; trlx, the APA authors' trainer, whitens "
                                         "per minibatch, unmasked). False (Eq. 3.5 as the paper writes it) is the "
                                         "default; the study over seeds compares both (RESULTS.md)")
    truncated_score: float = arg(-1.0, "reward of an answer cut at the length limit without EOS, in standard deviations "
                                       "of the finished answers' reward from their mean (-1: one below), measured on "
                                       "the reward the method's critic learns, per objective (common.shape_finished)")
    save_every: Positive[int] = arg(10, "iterations between checkpoints (and at the end)")
    resume: str = arg("auto", "auto|true|false. auto: continue from <out>/checkpoint when there is one, else start (what a "
                              "restarted or requeued job needs); true: a checkpoint is required; false: start "
                              "over (an existing checkpoint is replaced at the first save)")
    keep_previous: bool = arg(True, "keep the checkpoint before the last as <out>/checkpoint.prev, a fallback "
                                    "if the newest is ever damaged (twice the checkpoint disk)")
    keep_checkpoint: bool = arg(False, "keep <out>/checkpoint (policy, critic and their optimizer states, ~8x the "
                                       "policy) after the final save, to train further with more --iterations later; "
                                       "by default it is removed once policy/ and run_summary.json are written")
    max_nonfinite_steps: Positive[int] = arg(3, "stop after this many optimizer steps in a row with a non-finite loss, "
                                                "gradient or update (each is skipped; the weights never see it)")
    sample_every: Positive[int] = arg(10, "iterations between the few answers written to <out>/samples.jsonl and TensorBoard "
                                          "(also the first and the last iteration)")
    num_samples: NonNegative[int] = arg(4, "answers written each time (rank 0's first rollouts)")
    wandb_project: str = arg("", "also log to this Weights & Biases project (needs `pip install wandb`; TensorBoard "
                                 "files are always written under <out>/tensorboard)")
    peer_timeout: Positive[float] = arg(600.0, "seconds without a heartbeat from a rank (stopped, stuck, its "
                                               "host frozen) before the run names it and stops; no collective "
                                               "waits more than twice this")
    dry_run: bool = arg(False, "load, shard and check everything (models, tokenizer, data, batch sizes), train one "
                               "iteration saving nothing, print each model's size and each rank's peak memory (a "
                               "run's own stays near it), and exit")
    ground_truth: bool = arg(False, "tiny world only: log the true helpfulness and safety of every rollout (and its "
                                    "honesty when honest is among the objectives)")
    seed: int = arg(0, "seed")


RL_TINY = dict(policy="runs/tiny/world/base", reward_models="runs/tiny/rm_help/model,runs/tiny/rm_safe/model",
               data_root="runs/tiny/world/data", iterations=60, rollouts=64, minibatch=8, lr=2e-4, critic_lr=1e-3,
               max_prompt_len=32, max_new_tokens=40, save_every=20, ground_truth=True)


def rl_batch_sizes(args, world_size: int) -> tuple[int, int]:
    """(rollouts per rank, minibatch rows per rank), after checking that every size divides exactly."""
    for name, n, d in (("--rollouts", args.rollouts, world_size), ("--minibatch", args.minibatch, world_size),
                       ("--rollouts", args.rollouts, args.minibatch)):
        if n % d:
            fail(f"{name} {n} must be divisible by {d} ({'world size' if d == world_size else '--minibatch'})")
    return args.rollouts // world_size, args.minibatch // world_size


# ---- 2. checks before anything loads, and errors every rank leaves by
def number_list(text: str, flag: str, n: int, default: float) -> list[float]:
    """A flag's comma list of n finite numbers (empty: n times default); anything else stops, naming the flag."""
    if not text:
        return [default] * n
    values = []
    for item in text.split(","):
        try:
            values.append(float(item))
        except ValueError:
            raise SystemExit(f"{flag} {text!r}: {item.strip()!r} is not a number (give {n} comma-separated numbers, "
                             f"e.g. {','.join(['1'] * n)})") from None
    if not all(math.isfinite(v) for v in values):
        raise SystemExit(f"{flag} {text!r}: every value must be a finite number (not nan or inf)")
    if len(values) != n:
        raise SystemExit(f"{flag} {text!r} has {len(values)} values for {n} objectives; give one per objective")
    return values


def check_output_folder(out: Path, flag: str = "--out") -> None:
    """Before anything loads: the run folder is a folder (or can be made) and can be written."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"{flag} {out} is a file; give a folder (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test.{os.getpid()}"       # one per process: every rank checks at once
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise SystemExit(f"{flag} {out} cannot be written ({e.strerror}); give a folder you can write to") from None


def check_reward_objectives(paths: list[str], objectives: list[str], flag: str = "--reward-models") -> None:
    """Before anything loads: the reward models' config.json (id2label) score every objective, once each."""
    found = {}
    for path in paths:
        cfg = Path(path) / "config.json"
        if not cfg.exists():
            continue                                              # a hub id: checked when it loads
        for name in read_json(cfg).get("id2label", {}).values():
            if name in found:
                raise SystemExit(f"{flag}: objective {name!r} is scored by two reward models ({found[name]} and {path})")
            found[name] = path
    missing = [o for o in objectives if o not in found]
    if missing and all((Path(p) / "config.json").exists() for p in paths):
        raise SystemExit(f"{flag}: no reward model scores {missing}; the folders given score {sorted(found)} "
                         f"(their config.json id2label). Train one with 01_train_reward.py --objective {missing[0]}, "
                         f"or choose objectives among {sorted(found)}")


def check_data_files(data_root: str, sources) -> None:
    """Before anything loads: each source's train file is in --data-root (empty data_root: the hub, not checked)."""
    if not data_root:
        return
    if not Path(data_root).is_dir():
        raise SystemExit(f"--data-root {data_root} does not exist (build the tiny world: python 00_make_tiny_world.py)")
    missing = [f"{SOURCES[s][0]}/{SOURCES[s][1] or ''}" for s in sources if not _local_files(data_root, s, "train")]
    if missing:
        raise SystemExit(f"--data-root {data_root} has no train.jsonl(.gz) for {', '.join(missing)}; see "
                         f"../shared/reference/datasets.md for the layout, or build the tiny world")
    for source in sources:                        # a bad file is named now, not after the models load
        for split in ("train", "test"):
            for f in _local_files(data_root, source, split):
                read_jsonl(f)


def check_tracking(wandb_project: str) -> None:
    """--wandb-project needs the wandb package: checked at start, before anything loads or is written."""
    if wandb_project:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("--wandb-project needs the wandb package, which this project does not install: "
                             "pip install wandb (and wandb login, or WANDB_MODE=offline), or drop the flag") from None


def check_rl_inputs(args, objectives: list[str], out: Path) -> None:
    """02 and 03, before anything loads: tracking, the policy and reward-model folders, what the reward models score,
    the data files and the output folder (each check names its flag and the fix)."""
    check_tracking(args.wandb_project)
    check_model_folder(args.policy, "--policy", "causal_lm")
    check_can_build(args.policy, "--policy")                  # pi_0 and the policy; the critic on its backbone
    for path in args.reward_models.split(","):
        check_model_folder(path, "--reward-models", "sequence_classifier")
        check_can_build(path, "--reward-models", ("backbone",))
    check_reward_objectives(args.reward_models.split(","), objectives)
    check_formats_match(args.reward_models.split(","), args.policy, args.prompt_template)
    check_recorded_format(args.policy, args.prompt_template, "--policy")        # e.g. a policy trained before
    check_data_files(args.data_root, PROMPT_MIX)
    check_output_folder(out)


def fail(message: str) -> NoReturn:
    """Stop every rank (each calls it at the same point); only rank 0 prints the message (one copy, not one per rank).
    Under torch.distributed the ranks leave through teardown(1): a plain SystemExit would let the interpreter
    finalize with gloo's threads alive, which can abort the process (exit -6) after the message (see teardown)."""
    if not dist.is_initialized():
        raise SystemExit(message)
    if dist.get_rank() == 0:
        print(message, file=sys.stderr, flush=True)
    teardown(1)


def all_reduce_sum(values: list[float], device) -> list[float]:
    """Sum a list of numbers over ranks (counts, sums for means)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---- 3. the dry run
def peak_host_memory_report(models: dict, info: DistInfo) -> str:
    """A collective: each model's size and every rank's peak resident host memory (and GPU memory) so far."""
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}   # full sizes (DTensor numel)
    mine = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host": socket.gethostname(),
            "node": os.environ.get("GROUP_RANK", "0"), "local": info.local_rank,   # GROUP_RANK: torchrun's node rank
            "gpu": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None}
    ranks = [None] * info.world_size
    dist.all_gather_object(ranks, mine)
    gib = lambda b: f"{b / 2**30:.2f} GiB"
    lines = [f"  {n}: {s / 1e6:.1f}M parameters, {gib(4 * s)} in fp32" for n, s in sizes.items()]
    lines += [f"  rank {r} (node {d['node']}, host {d['host']}, local rank {d['local']}): peak host memory {gib(d['rss'])}"
              + (f", GPU {gib(d['gpu'])}" if d["gpu"] is not None else "") for r, d in enumerate(ranks)]
    return "\n".join(lines)


def dry_run_exit(tag: str, models: dict, info: DistInfo, measured: str = "one training iteration") -> NoReturn:
    """--dry-run, after `measured` (02, 03: one training iteration, 01: one step; nothing saved): print each model's
    size and each rank's peak memory so far, which a run's own peak (run_summary.json) stays near, and exit 0."""
    print0(f"[{tag}] dry run done: the peak memory after {measured} (nothing was saved):\n"
           + peak_host_memory_report(models, info))
    teardown(0)


def rl_dry_run_plan(args, n_prompts: int, local: int, local_mb: int, info: DistInfo, dtype, start: int) -> str:
    return (f"{n_prompts} training prompts; {args.iterations} iterations of {args.rollouts} rollouts, {local} per rank, "
            f"minibatches of {local_mb} per rank, on {info.world_size} ranks ({info.device.type}, {dtype}); "
            f"{'resuming' if start else 'starting'} at iteration {start}")


# ---- 4. metrics: metrics.jsonl, samples, TensorBoard (and W&B), the run summary
def _keep_upto(path: Path, step: int, key: str) -> None:
    """Drop the JSON lines of path whose `key` is past step (and a last line cut short by a killed process)."""
    kept = []
    for l in path.read_text().splitlines():
        try:
            if l and json.loads(l).get(key, 0) <= step:
                kept.append(l)
        except ValueError:
            continue
    write_whole(path, "".join(l + "\n" for l in kept))


class MetricsLog:
    """A run's record, written by rank 0 (other ranks do nothing):
      <run>/metrics.jsonl   one JSON object per step: what the report reads;
      <run>/samples.jsonl   a few answers with their scores every so often (samples());
      <run>/tensorboard/    the same scalars (same names) and samples as text, live: `tensorboard --logdir runs`;
      Weights & Biases      when wandb_project is given: a mirror of the TensorBoard files (sync_tensorboard), so
                            one logging path (the wandb package is then required).

    resume_step: on resume, what was written after that step (after the last checkpoint) is dropped, so
    the files read as one uninterrupted run (TensorBoard is told to purge those steps too).
    """

    def __init__(self, path: str | Path, enabled: bool, resume_step: int | None = None, tensorboard: bool = True,
                 wandb_project: str = "", config: dict | None = None):
        self.path, self.enabled = Path(path), enabled
        self.samples_path = self.path.with_name("samples.jsonl")
        self.tb = self.wandb = None
        problem = [None]                             # every rank builds its MetricsLog at the same point
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is None:
                self._keep_an_earlier_record()
            for p, key in ((self.path, "step"), (self.samples_path, "iteration")):
                if resume_step is not None and p.exists():
                    _keep_upto(p, resume_step, key)
            if resume_step:
                problem[0] = self._incomplete(resume_step, tensorboard)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            fail(problem[0])
        if not enabled:
            return
        if not self.path.exists():
            self.path.write_text("")
        if wandb_project:          # first: W&B mirrors the TensorBoard writer made below (sync_tensorboard)
            if not tensorboard:
                raise ValueError("W&B mirrors TensorBoard here: wandb_project needs tensorboard=True")
            check_tracking(wandb_project)
            import wandb

            # named by the run folder's last three parts (whiten_true/seed0/molma: unique in a study), grouped by
            # its parent folder; WANDB_NAME / WANDB_RUN_GROUP in the environment win
            parts = self.path.parent.resolve().parts
            self.wandb = wandb.init(project=wandb_project, name=os.environ.get("WANDB_NAME", "/".join(parts[-3:])),
                                    group=os.environ.get("WANDB_RUN_GROUP", "/".join(parts[-3:-1])),
                                    config=config or {}, resume="allow", sync_tensorboard=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise SystemExit(f"TensorBoard logging needs the tensorboard package ({e}); "
                                 f"pip install -r requirements.txt") from None
            self.tb = SummaryWriter(str(self.path.parent / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
            _quiet_writer_thread_errors()

    def _keep_an_earlier_record(self) -> None:
        """A fresh run in a folder that holds another run's record (no checkpoint to continue it, or --resume
        false): that record is kept beside it, renamed with the time, never replaced without a word."""
        old = [p for p in (self.path, self.samples_path, self.path.parent / "tensorboard")
               if p.exists() and (p.is_dir() or p.stat().st_size)]
        if not old:
            self.path.unlink(missing_ok=True)
            self.samples_path.unlink(missing_ok=True)
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        moved = []
        for p in old:
            to = p.with_name(f"{p.stem}.replaced-{stamp}{p.suffix}")
            p.rename(to)
            moved.append(to.name)
        self.samples_path.unlink(missing_ok=True)
        print(f"[metrics] {self.path.parent} held the record of an earlier run and no checkpoint continues it: this "
              f"run starts fresh, the old record is kept as {', '.join(moved)}", flush=True)

    def _incomplete(self, step: int, tensorboard: bool) -> str | None:
        """On resume: metrics.jsonl must hold every step up to the checkpoint's, once each, and TensorBoard's
        event files must exist, or the resumed record would silently miss the first part of the run. -> what is
        wrong and what to do, or None."""
        have = [json.loads(l).get("step") for l in (self.path.read_text().splitlines() if self.path.exists() else [])]
        tb = self.path.parent / "tensorboard"
        events = list(tb.glob("events.out.tfevents.*")) if tb.is_dir() else []
        if have != list(range(1, step + 1)) or (tensorboard and not events):
            what = (f"{self.path} holds {_ranges(have) or 'no step'} of the checkpoint's 1-{step}"
                    if have != list(range(1, step + 1)) else f"{tb} has no event files")
            return (
                f"cannot resume in {self.path.parent}: {what}. The record of the run up to its checkpoint is "
                f"incomplete (was the folder moved, copied in part or cleaned while the run trained?), and continuing "
                f"would leave a record that misses part of the run. What to do: put the missing files back (from the "
                f"moved or original folder), or start a new run with another --out (or --resume false here; the "
                f"old record is then kept beside it).")
        return None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if not self.path.exists():               # a moved or deleted run folder: never recreate half of it
            raise SystemExit(f"{self.path} has disappeared while the run trained (the run folder {self.path.parent} "
                             f"was moved or deleted?). Stopping rather than writing a partial record there. Move the "
                             f"folder back and run the same command again to continue from its last checkpoint.")
        with self._on_disk(self.path):            # a full or read-only disk, a lost mount: named, the run stopped
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            with self._on_disk(self.path.parent / "tensorboard"):
                for k, v in scalars.items():
                    self.tb.add_scalar(k, v, step)
                self.tb.flush()

    @staticmethod
    @contextlib.contextmanager
    def _on_disk(path: Path):
        """A write to path (or TensorBoard's writer thread, which hands its error to the next call): an OSError stops
        the run with the file and what to do; a cut last line is dropped when the run resumes (_keep_upto)."""
        try:
            yield
        except OSError as e:
            raise SystemExit(f"could not write {path} ({type(e).__name__}: {e}); is the disk full or read-only? The "
                             f"last checkpoint is intact. Free space or fix the mount, then run the same command again "
                             f"to continue from it.") from None

    def samples(self, iteration: int, rows: list[dict]) -> None:
        """Append rows (prompt, answer, scores...) of one iteration to samples.jsonl and TensorBoard's text tab."""
        if not self.enabled or not rows:
            return
        with self._on_disk(self.samples_path):
            with self.samples_path.open("a") as f:
                f.write("".join(json.dumps({"iteration": iteration, **r}) + "\n" for r in rows))
        if self.tb is not None:
            cols = list(rows[0])
            table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "\n".join(
                "| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]).replace("|", "/").replace("\n", " ")
                                  for c in cols) + " |" for r in rows)
            with self._on_disk(self.path.parent / "tensorboard"):
                self.tb.add_text("samples", table, iteration)
                self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _quiet_writer_thread_errors() -> None:
    """TensorBoard's writer thread re-raises a write error (a full disk) and Python prints it as a bare traceback; the
    next call in the main thread gets the same error, which MetricsLog turns into its message. Only that one is shown."""
    import threading

    default = threading.excepthook

    def hook(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard")):
            default(args)

    if getattr(threading.excepthook, "__name__", "") != "hook":
        threading.excepthook = hook


def _ranges(steps: list) -> str:
    """[1, 2, 3, 7, 8] -> 'steps 1-3, 7-8'."""
    if not steps:
        return ""
    parts, start, prev = [], steps[0], steps[0]
    for x in steps[1:] + [None]:
        if x is not None and isinstance(prev, int) and x == prev + 1:
            prev = x
            continue
        parts.append(f"{start}" if start == prev else f"{start}-{prev}")
        start = prev = x
    return "steps " + ", ".join(parts)


def tiny_world_truth(args, prompts: list[str], answers: list[str], objectives: list[str]) -> dict | None:
    """--ground-truth true (the tiny world only): the world's true score of each answer per objective, logged beside
    the reward models' (truth/<objective>); None otherwise, and the tiny world is never imported at paper scale."""
    if not args.ground_truth:
        return None
    import tiny_world

    return tiny_world.truths_of(prompts, answers, objectives)


def iteration_metrics(step: int, r: Rollouts, rewards: torch.Tensor, rm_objectives: list[str], heads: list[str],
                      steps: list[dict], device, truth: list[dict[str, float]] | None = None) -> dict:
    """One line of metrics.jsonl (a collective: every rank calls it).

    Rollout statistics are means over every rank's rollouts (named sums, one all-reduce, divided by the
    global count); minibatch statistics (steps: one dict per minibatch with apa_loss, value_loss and
    grad_norms, each a list of K) are means over minibatches, then over ranks.
    rewards: [B, T, K] the per-token rewards of Eq. 3.3; truth: tiny world only, {objective: true score} per rollout.
    """
    sums = {"n": float(len(r.prompts)), "objective/kl": ((r.logprobs - r.ref_logprobs) * r.mask).sum().item(),
            "response/length": r.mask.sum().item(), "response/eos_rate": r.ended.float().sum().item()}
    sums.update({f"{o}/score": r.scores[:, k].sum().item() for k, o in enumerate(rm_objectives)})
    sums.update({f"{h}/shaped_reward": rewards[..., k].sum().item() for k, h in enumerate(heads)})
    if truth is not None:
        sums.update({f"truth/{k}": sum(t[k] for t in truth) for k in truth[0]})
    for key, name in (("apa_loss", "apa_loss"), ("value_loss", "value_loss"), ("grad_norms", "grad_norm")):
        for k, h in enumerate(heads):
            sums[f"{h}/{name}"] = sum(s[key][k] for s in steps) / len(steps)
    tot = dict(zip(sums, all_reduce_sum(list(sums.values()), device)))
    world = dist.get_world_size() if dist.is_initialized() else 1
    rec = {"step": step}
    rec.update({k: v / (world if k.endswith(("_loss", "grad_norm")) else tot["n"]) for k, v in tot.items() if k != "n"})
    rec["update_norm"] = sum(s["update_norm"] for s in steps) / len(steps)
    if "gram" in steps[0]:                    # MOLMA, K > 1: what the aligner saw, averaged over minibatches
        K = len(heads)
        grams = torch.tensor([s["gram"] for s in steps], dtype=torch.float64)             # [minibatches, K, K]
        norms = grams.diagonal(dim1=1, dim2=2).clamp(min=1e-30).sqrt()
        cos = grams / (norms[:, :, None] * norms[:, None, :])
        iu = torch.triu_indices(K, K, 1)
        rec["amtl/cos"] = cos[:, iu[0], iu[1]].mean().item()              # < 0: the objectives' gradients conflict
        if K > 2:                             # and each pair's, e.g. amtl/cos/help-honest
            rec.update({f"amtl/cos/{heads[a]}-{heads[b]}": cos[:, a, b].mean().item() for a, b in zip(*iu.tolist())})
        rec["amtl/cond_before"] = sum(s["cond_before"] for s in steps) / len(steps)
        rec["amtl/cond_after"] = sum(s["cond_after"] for s in steps) / len(steps)     # 1 after alignment
    agreed = [s["agreement"] for s in steps if "agreement" in s]     # 02 --compare-exact, over the steps taken
    if agreed:
        rec.update({f"amtl/{k}": sum(a[k] for a in agreed) / len(agreed) for k in agreed[0]})
    return rec


def sample_rows(r: Rollouts, answers: list[str], rm_objectives: list[str], n: int,
                truth: list[dict[str, float]] | None = None) -> list[dict]:
    """The first n of this rank's rollouts as rows for MetricsLog.samples: the prompt, the answer, whether it
    ended with EOS, each reward model's probability and (tiny world) the true scores."""
    rows = []
    for i in range(min(n, len(answers))):
        row = {"prompt": r.prompts[i], "answer": answers[i], "ended_with_eos": bool(r.ended[i])}   # as in answers.jsonl
        row.update({f"rm_{o}": float(r.scores[i, k]) for k, o in enumerate(rm_objectives)})
        if truth is not None:
            row.update({f"true_{k}": v for k, v in truth[i].items()})
        rows.append(row)
    return rows


def peak_rss_per_rank() -> list[int]:
    """A collective: every rank's peak resident host memory so far, in bytes, in rank order (run_summary.json)."""
    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [int(mine.item())]
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)                                   # gloo: CPU tensors
    return [int(x.item()) for x in parts]


def write_run_summary(out: Path, summary: dict, t_train: float) -> None:
    """Rank 0: <out>/run_summary.json from metrics.jsonl (times, the last line) plus the run's own fields."""
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l]
    per_it = sorted(l["time/iteration"] for l in lines)
    summary = {**summary, "iterations": len(lines), "train_seconds_this_process": round(time.perf_counter() - t_train, 1),
               "train_seconds": round(sum(per_it), 1), "median_seconds_per_iteration": per_it[len(per_it) // 2],
               "phase_seconds_median": {k: sorted(l[f"time/{k}"] for l in lines)[len(lines) // 2]
                                        for k in ("generation", "scoring", "update")},
               "final": lines[-1], "segments": run_segments()}
    write_whole(out / "run_summary.json", json.dumps(summary, indent=2))
    print0(f"[{summary['method']}] done: {out / 'policy'}; " + ", ".join(
        f"{k}={v:.3f}" for k, v in lines[-1].items() if k.endswith(("score", "kl")) or k.startswith("truth")))


def compare_with_exact(policy: torch.nn.Module, losses: torch.Tensor, B: torch.Tensor, omega: torch.Tensor) -> dict:
    """02 --compare-exact (a diagnostic that costs the exact aligner's K backward passes; a collective): the
    representation aligner's update formed from the K parameter gradients, G (B omega), set as the policy's .grad
    (the update one backward of sum_k (B omega)_k L_k gives, to rounding), and how it stands to Algorithm 1's
    G B_exact omega: their cosine, and cond(G) before alignment and after each B (after B_exact: 1)."""
    grads = objective_gradients(policy, losses)                                # [K, D_local]
    exact, gram, _ = amtl_align_sharded(grads, omega)
    update = grads.T @ (B @ omega.to(B.dtype)).to(grads.dtype)
    set_flat_grad(policy, update)
    dots = torch.stack([update @ exact, update @ update, exact @ exact]).double()
    if dist.is_initialized():
        dist.all_reduce(dots)                                                  # sums over every rank's shard
    gram = gram.double()
    return {"cos_to_exact": float(dots[0] / (dots[1] * dots[2]).sqrt().clamp(min=1e-300)),
            "exact_cond_before": condition_number(gram),
            "exact_cond_after": condition_number(B.double().T @ gram @ B.double())}


def minibatch_stats(apa: torch.Tensor, vloss: torch.Tensor, update_norm: float, aligned: tuple | None = None,
                    agreement: dict | None = None) -> dict:
    """What one minibatch logs: the K APA and value losses, the update's norm and, for K > 1, what the aligner saw
    (aligned: (M, B), or None when the step was skipped: NaN then): the objectives' gradient norms, M, and
    cond(G) before and after alignment. M is G^T G, or for the representation aligner E E^T (norms and cosines of
    dL_k/dlogpi); agreement: compare_with_exact's numbers. With one objective the gradient norm is the update's."""
    K = apa.numel()
    stats = {"apa_loss": apa.tolist(), "value_loss": vloss.tolist(), "update_norm": update_norm}
    if agreement is not None:
        stats["agreement"] = agreement
    if K == 1:
        stats["grad_norms"] = [update_norm]
    elif aligned is not None:
        gram, B = aligned
        stats.update({"grad_norms": gram.diagonal().clamp(min=0).sqrt().tolist(), "gram": gram.tolist(),
                      "cond_before": condition_number(gram), "cond_after": condition_number(B.T @ gram @ B)})
    else:
        nan = float("nan")
        stats.update({"grad_norms": [nan] * K, "gram": [[nan] * K] * K, "cond_before": nan, "cond_after": nan})
    return stats


class PhaseClock:
    """Seconds per phase of an iteration: start(), then lap(name) at the end of each phase; laps() -> the
    metrics' {time/<name>: s, ..., time/iteration: s}."""

    def start(self) -> None:
        self.t0 = self.t = time.perf_counter()
        self.times = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[f"time/{name}"], self.t = now - self.t, now

    def laps(self) -> dict:
        return {**self.times, "time/iteration": self.t - self.t0}


def state_scalars(state: dict, objectives: list[str]) -> dict:
    """A method's state (e.g. Fast RL's weights, lambda) as metrics: state/<name>, and a list of one number per
    objective also as state/<name>/<objective>, one scalar each for TensorBoard."""
    rec = {f"state/{k}": v for k, v in state.items()}
    rec.update({f"state/{k}/{o}": x for k, v in state.items() if isinstance(v, list) and len(v) == len(objectives)
                for o, x in zip(objectives, v)})
    return rec


def log_iteration(metrics: MetricsLog, it: int, args, r: Rollouts, answers: list[str], rm_objectives: list[str],
                  record: dict, truth: list[dict[str, float]] | None = None) -> None:
    """The bookkeeping of one RL iteration (02 and 03), on rank 0: its metrics.jsonl line (record: iteration_metrics
    and what the script adds), a warning when no answer ended, and every --sample-every iterations a few answers
    in samples.jsonl, with their true scores when the script hands them (truth, tiny world)."""
    metrics.write(record)
    if record["response/eos_rate"] == 0 and (it == 0 or (it + 1) % 10 == 0):   # every answer cut: nothing to learn from
        print0(f"[warning] iteration {it + 1}: no answer ended with EOS within --max-new-tokens {args.max_new_tokens}: "
               f"every one is cut and gets the same --truncated-score, so the reward models teach the policy nothing "
               f"(only the KL penalty moves it). Raise --max-new-tokens (the tiny preset uses {RL_TINY['max_new_tokens']}).")
    if it == 0 or (it + 1) % args.sample_every == 0 or it + 1 == args.iterations:     # what the policy says
        metrics.samples(it + 1, sample_rows(r, answers, rm_objectives, args.num_samples, truth))


# ---- 5. checkpoints: written atomically with a manifest, verified, resumed under the same arguments; one writer per folder
def atomic_dir_write(out_dir: str | Path, write, keep_previous: bool = False, in_run_folder: bool = False) -> None:
    """Call write(tmp_dir), then swap tmp_dir into out_dir.

    A crash while writing leaves the previous out_dir intact; the swap itself is two renames.
    keep_previous: the replaced out_dir is kept as <out_dir>.prev (replacing an older one) instead of deleted.
    in_run_folder: out_dir's parent is a run's folder, which exists while the run holds its lock: if it is gone
    (moved or deleted mid-run), stop rather than recreate a folder with half a run in it.
    """
    out_dir = Path(out_dir)
    tmp = _fresh_tmp(out_dir, in_run_folder)
    try:
        write(tmp)
    except Exception as e:                     # a full disk, a quota, a lost mount: say so, keep what was there
        raise SystemExit(_not_written(out_dir, tmp, e)) from e
    _publish(tmp, out_dir, keep_previous)


def _fresh_tmp(out_dir: Path, in_run_folder: bool) -> Path:
    """An empty <out_dir>.tmp to write into (a run folder that disappeared mid-run: stop, see atomic_dir_write)."""
    if in_run_folder and not out_dir.parent.is_dir():
        raise SystemExit(f"the run folder {out_dir.parent} has disappeared while the run trained (moved or deleted?); "
                         f"not writing {out_dir.name} there. Move the folder back and run the same command again to "
                         f"continue from its last checkpoint.")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _not_written(out_dir: Path, tmp: Path, e: Exception) -> str:
    """Remove the partial tmp; -> the message: which file, why, and that the previous out_dir is intact."""
    shutil.rmtree(tmp, ignore_errors=True)
    what = getattr(e, "filename", None) or tmp
    return (f"could not write {what} ({type(e).__name__}: {e}); is the disk full? Nothing was replaced: "
            + (f"the previous {out_dir} is intact" if out_dir.exists() else f"{out_dir} was not written")
            + f", and the partial {tmp.name} was removed. Free space, then run the same command again.")


def _publish(tmp: Path, out_dir: Path, keep_previous: bool) -> None:
    """fsync tmp's files and folders, then swap it into out_dir with two renames (the replaced one kept as .prev)."""
    old = out_dir.with_name(out_dir.name + (".prev" if keep_previous else ".old"))
    fsync_tree(tmp)                            # on disk before a rename publishes it: a power loss must not leave
    shutil.rmtree(old, ignore_errors=True)     # a manifest that names data never written
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)                        # killed between the renames: resume_from takes up the complete tmp
    _fsync_path(out_dir.parent)                # the renames themselves
    if not keep_previous:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """fsync every file under folder, then every folder (deepest first), so their data and names are on disk."""
    paths = sorted(Path(folder).rglob("*"), key=lambda p: -len(p.parts))
    for p in [p for p in paths if p.is_file()] + [p for p in paths if p.is_dir()] + [Path(folder)]:
        _fsync_path(p)


def write_pretrained(folder: Path, model, state: dict, tokenizer=None, template: str | None = None) -> None:
    """Rank 0: a Hugging Face save_pretrained folder from a gathered state dict (safetensors), with the tokenizer
    and the prompt format (template: --prompt-template) it was trained in."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})
    if template:              # the format travels with the model (check_formats_match reads it)
        model.config.molma_prompt_format = template
    # and the weights' checksum, checked whenever the project reads the folder back (check_model_folder): a file
    # damaged behind an intact header loads without an error anywhere else
    model.config.molma_weights_sha256 = {"model.safetensors": _sha256(folder / "model.safetensors")}
    model.config.save_pretrained(folder)
    if model.can_generate() and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """load_file with an error that names the file (a truncated download or save, a full disk)."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:       # SafetensorError, OSError: the library's message alone names no file
        raise SystemExit(f"cannot read {path}: {e}. The file is damaged or truncated; restore it, or write it again "
                         f"(for a checkpoint: resume from the kept previous one, or start over with --resume false)")


def check_finite_weights(model: torch.nn.Module, what: str) -> None:
    """A collective: raise before a model with a non-finite weight can be written anywhere."""
    bad = torch.zeros((), dtype=torch.float64, device=next(model.parameters()).device)
    for p in model.parameters():
        bad += (~torch.isfinite(_local(p.detach()))).sum()
    if dist.is_initialized():
        dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(f"refusing to save {what}: {int(bad.item())} weights are not finite (NaN or inf); "
                           f"nothing was written, earlier checkpoints are untouched")


def save_pretrained_folder(model, out_dir, tokenizer=None, template: str | None = None) -> None:
    """Write an FSDP model as a save_pretrained folder (write_pretrained), atomically. Every rank calls it; rank 0
    writes."""
    check_finite_weights(model, str(out_dir))
    state = full_state_dict(model)
    if dist.get_rank() == 0:
        atomic_dir_write(out_dir, lambda tmp: write_pretrained(tmp, model, state, tokenizer, template),
                         in_run_folder=True)
    dist.barrier()


def _sharded_state(models: dict, optimizers: dict) -> tuple[dict, dict]:
    """-> ({"<name>/model/<fqn>": this rank's shard, "<name>/optim/<fqn>/<exp_avg|exp_avg_sq|step>": ...},
    {name: AdamW's param_groups}): every model's weights and optimizer state as this rank holds them (DTensor
    shards, nothing gathered), in one flat dict of tensors for torch.distributed.checkpoint. A fresh optimizer's
    state is made (zeros) so that a resume has shards to load into."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    flat, groups = {}, {}
    for n, m in models.items():
        flat.update({f"{n}/model/{k}": v for k, v in get_model_state_dict(m).items()})
        if n in optimizers:
            osd = get_optimizer_state_dict(m, optimizers[n])
            for fqn, st in osd["state"].items():
                flat.update({f"{n}/optim/{fqn}/{k}": v if torch.is_tensor(v) else torch.tensor(v) for k, v in st.items()})
            groups[n] = osd["param_groups"]
    return flat, groups


def _files_of_about(flat: dict, world_size: int, nbytes: int) -> dict[str, int]:
    """{key: file number}: consecutive keys in files of about nbytes per rank. The writer holds one file's bytes at a
    time (safetensors serializes a file in memory), so this bounds a save's memory beyond the shards themselves; the
    same numbers on every rank (DTensor sizes are global)."""
    index, size, n = {}, 0.0, 1
    for k, v in flat.items():
        b = v.numel() * v.element_size() / (world_size if hasattr(v, "full_tensor") else 1)
        if size and size + b > nbytes:
            n, size = n + 1, 0.0
        index[k], size = n, size + b
    return index


def save_rl_checkpoint(folder: Path, models: dict, optimizers: dict, trainer_state: dict,
                       keep_previous: bool = False) -> None:
    """Every rank calls it. models/optimizers: {name: FSDP model / its optimizer}.

    Each rank writes its own shards of every model's weights and AdamW state to <folder>/shards/ through
    torch.distributed.checkpoint in safetensors (HuggingFaceStorageWriter; nothing is gathered on one rank, nothing
    pickled, and a resume on another number of ranks reshards it), and hashes what it wrote; rank 0 adds
    rng.safetensors (every rank's RNG), trainer_state.json (with AdamW's param_groups) and manifest.json (every
    file's size and sha256, checked before a resume), then swaps the folder in at once: a crash mid-save keeps the
    previous checkpoint. Models with a non-finite weight are refused before anything is written. keep_previous: the
    replaced checkpoint stays as <folder>.prev. The final weights are a save_pretrained folder of their own."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    for n, m in models.items():
        check_finite_weights(m, f"the checkpoint's {n}")
    flat, groups = _sharded_state(models, optimizers)
    rng = {"cpu": gather_rows(torch.get_rng_state()[None])}
    if torch.cuda.is_available():
        rng["cuda"] = gather_rows(torch.cuda.get_rng_state().to(torch.cuda.current_device())[None]).cpu()
    rank, problem = dist.get_rank(), [None]
    tmp = folder.with_name(folder.name + ".tmp")
    if rank == 0:
        try:
            _fresh_tmp(folder, in_run_folder=True)
        except SystemExit as e:
            problem[0] = str(e)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        fail(problem[0])
    try:
        files = _files_of_about(flat, dist.get_world_size(), 2**28)   # 256 MiB a file
        dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "shards"), fqn_to_index_mapping=files,
                                                                    save_distributed=True))
        mine = sorted((tmp / "shards").glob(f"shard-{rank + 1:05d}-*.safetensors"))   # the files this rank wrote
        for f in mine:
            _fsync_path(f)
        hashes = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in mine}
    except (Exception, dcp.api.CheckpointException) as e:   # any rank's failure (a full disk) reaches every rank
        first = next(iter(getattr(e, "failures", {}).items()), None)      # {rank: (exception, traceback)}
        hashes = {"error": f"rank {first[0]}: {type(first[1][0]).__name__}: {first[1][0]}" if first else
                           f"{type(e).__name__}: {e}"}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, hashes)
    errors = [h["error"] for h in every if "error" in h]
    if rank == 0:
        try:
            if errors:
                raise OSError(errors[0])
            save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
            write_whole(tmp / "trainer_state.json", json.dumps({**trainer_state, "param_groups": groups,
                                                                "world_size": dist.get_world_size(),
                                                                "segments": run_segments()}, indent=2))
            write_manifest(tmp, {k: v for h in every for k, v in h.items()})
            _publish(tmp, folder, keep_previous)
        except (OSError, SystemExit) as e:
            problem[0] = _not_written(folder, tmp, e)
    dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        fail(problem[0])


def _sha256(path: Path) -> str:
    """A file's sha256, read once per process for each version of it (its path, size and modification time): a stage
    checks a folder's recorded checksum and then fingerprints the same file as one of the run's inputs."""
    st = Path(path).stat()
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, known: dict | None = None) -> None:
    """<folder>/manifest.json: {relative path: {bytes, sha256}} of every file in the folder. known: entries already
    computed (each rank hashes the shards it wrote), the rest are hashed here."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    known = known or {}
    manifest = {rel: known.get(rel) or {"bytes": p.stat().st_size, "sha256": _sha256(p)}
                for p in files for rel in [p.relative_to(folder).as_posix()]}
    write_whole(folder / "manifest.json", json.dumps(manifest, indent=1))


def verify_checkpoint(folder: Path) -> list[str]:
    """What is wrong with a checkpoint folder against its manifest (empty: nothing)."""
    mf = folder / "manifest.json"
    if not mf.exists():
        return [f"{mf} is missing (the checkpoint was not completely written)"]
    try:
        manifest = json.loads(mf.read_text())
    except ValueError as e:
        return [f"{mf} is not valid JSON ({e})"]
    problems = []
    for rel, want in manifest.items():
        p = folder / rel
        if not p.exists():
            problems.append(f"{p} is missing")
        elif p.stat().st_size != want["bytes"]:
            problems.append(f"{p} has {p.stat().st_size} bytes, the manifest says {want['bytes']} (truncated or overwritten)")
        elif _sha256(p) != want["sha256"]:
            problems.append(f"{p} does not match its sha256 in the manifest (damaged)")
    return problems


def checkpoint_iteration(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / "trainer_state.json").read_text())["iteration"])
    except (OSError, ValueError, KeyError):
        return None


# What a resumed run may change: how long it runs and how it is recorded, never what it computes. Every other
# field of its arguments (objectives and their order, omega, method and weights, rollouts, minibatch, learning
# rates, beta, lambda, whitening, seed, models, template, precision, ...) must equal the checkpoint's.
MAY_CHANGE_ON_RESUME = ("iterations", "save_every", "sample_every", "num_samples", "wandb_project", "resume",
                        "keep_previous", "keep_checkpoint", "peer_timeout", "max_nonfinite_steps", "dry_run", "out")


PATH_FLAGS = ("policy", "reward_models", "base_model", "data_root")    # compared as the files they name


def _real_paths(value) -> list[str]:
    """A path flag's comma list, each item as its real path when it exists here (a hub id as it is)."""
    return [os.path.realpath(os.path.expanduser(p)) if Path(p).expanduser().exists() else p
            for p in str(value or "").split(",") if p]


def config_changes(old: dict, args) -> list[str]:
    """The fields that differ between a checkpoint's arguments (old) and a new command's (args, its dataclass), as
    'flag: old -> new'. Not a change: a path spelled another way (absolute, relative, a trailing slash, through a
    symlink: the same real path), and a flag the checkpoint does not know (added by a code update) at its default."""
    new = dataclasses.asdict(args)
    defaults = {f.name: f.default for f in dataclasses.fields(args)}
    changed = []
    for k in sorted(set(old) | set(new)):
        if k in MAY_CHANGE_ON_RESUME or (k not in old and new.get(k) == defaults.get(k)):
            continue
        if k in PATH_FLAGS and _real_paths(old.get(k)) == _real_paths(new.get(k)):
            continue
        if old.get(k) != new.get(k):
            changed.append(f"--{k.replace('_', '-')}: {old.get(k)!r} -> {new.get(k)!r}")
    return changed


def _fingerprint(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256(path)}


def _input_files(args) -> dict[str, str]:
    """{real path of a file the run reads: the flag that names it}: each model folder's weights and config.json, and
    each data file under --data-root (a hub id, or the hub's datasets, have no local file to fingerprint)."""
    files = {}
    for flag in PATH_FLAGS:
        for p in _real_paths(getattr(args, flag, "")):
            folder = Path(p)
            if not folder.is_dir():
                continue
            found = (sorted(folder.rglob("*.jsonl")) + sorted(folder.rglob("*.jsonl.gz")) if flag == "data_root" else
                     sorted(folder.glob("*.safetensors")) + [folder / "config.json"])
            files.update({str(f): f"--{flag.replace('_', '-')}" for f in found if f.is_file()})
    return files


def run_inputs(ckpt: Path, args, resume: bool, tag: str) -> dict | None:
    """Every rank, after resume_from: what the run reads, fingerprinted (size, mtime, sha256) at its first start and
    kept in every checkpoint; -> that record (rank 0; None elsewhere). On resume, a model folder or data file that
    changed since is refused, naming it: a run continued against another reward model or data set would mix two runs
    without a word. A file with the recorded size and time is taken as the same; any other is hashed."""
    record, problem = None, [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        now = _input_files(args)
        if not resume:
            record = {f: {"flag": flag, **_fingerprint(Path(f))} for f, flag in now.items()}
        else:
            record = read_json(ckpt / "trainer_state.json").get("inputs")
            changed = []
            for f, old in (record or {}).items():
                p = Path(f)
                if not p.is_file():
                    changed.append(f"{old['flag']}: {f} is gone")
                elif (p.stat().st_size, p.stat().st_mtime_ns) != (old["size"], old["mtime_ns"]):
                    now_sha = _sha256(p)                 # a copy has another time: the same bytes are the same file
                    if now_sha != old["sha256"]:
                        changed.append(f"{old['flag']}: {f} has changed (sha256 {old['sha256'][:12]}... -> "
                                       f"{now_sha[:12]}...)")
            changed += [f"{flag}: {f} is new" for f, flag in now.items() if record is not None and f not in record]
            if changed:
                problem[0] = (f"[{tag}] what the run reads has changed since its checkpoint at {ckpt} was written:\n  "
                              + "\n  ".join(changed) + "\nContinuing would train against other inputs than the run "
                              f"started with. What to do: put the original files back to continue, or start a new run "
                              f"(another --out, or --resume false).")
            record = record if record is not None else {f: {"flag": fl, **_fingerprint(Path(f))} for f, fl in now.items()}
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(problem, src=0)
    if problem[0]:
        fail(problem[0])
    return record


def check_resume_config(ckpt: Path, args, tag: str) -> None:
    """Refuse to continue a checkpoint under other arguments than it was trained with (see MAY_CHANGE_ON_RESUME)."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    finished = (ckpt.parent / "run_summary.json").exists()
    # never advise --resume false where it would overwrite a finished run
    fresh = "another --out" if finished else "another --out, or --resume false (the checkpoint is replaced)"
    if state.get("method") not in (None, tag):
        script = "02_train_molma.py" if state["method"] == "molma" else "03_train_baselines.py"
        fail(f"[{tag}] {ckpt.parent} holds a{' finished' if finished else 'n unfinished'} {state['method']} run "
             f"({script}), not a {tag} one: this command would mix two methods in one folder. What to do: give this run "
             f"{fresh}" + (f"; to continue the {state['method']} run, run {script} with its arguments"
                                   if not finished else "") + ".")
    old = state.get("config")
    if old is None:
        return                                     # a checkpoint from before configurations were saved
    changes = config_changes(old, args)
    if changes:
        fail(f"[{tag}] the checkpoint at {ckpt} was trained with other arguments; resuming would mix two runs:\n  "
             + "\n  ".join(changes) + f"\nWhat to do: run with the checkpoint's values to continue it, or start a "
             f"new run with {fresh}" + (" (this folder's run is finished: keep it)" if finished else "") + ". Only "
             f"{', '.join('--' + f.replace('_', '-') for f in MAY_CHANGE_ON_RESUME)} may change on resume.")


def resume_from(ckpt: Path, mode: str, tag: str, args=None) -> bool:
    """Decide from --resume (auto / true / false) whether to continue from ckpt; every rank calls it.

    A checkpoint is verified against its manifest on rank 0 before it is used; a damaged one stops the
    run with the file's name and what to do (the kept previous checkpoint, or --resume false). args (the new
    command's arguments, a dataclass) must match the checkpoint's (check_resume_config).
    """
    if mode not in ("auto", "true", "false"):
        raise SystemExit(f"--resume must be auto, true or false, got {mode!r}")
    if mode != "false":
        recover_interrupted_save(ckpt, tag)
    it, prev = checkpoint_iteration(ckpt), ckpt.with_name(ckpt.name + ".prev")
    if dist.is_initialized() and dist.get_world_size() > 1:      # every rank reads the checkpoint: all must see it
        seen = [None] * dist.get_world_size()
        dist.all_gather_object(seen, (it, socket.gethostname()))
        blind = [f"rank {r} (host {h})" for r, (i, h) in enumerate(seen) if i != seen[0][0]]
        if blind:
            fail(f"[{tag}] rank 0 (host {seen[0][1]}) finds the checkpoint {ckpt} at iteration {seen[0][0]}, but "
                 f"{', '.join(blind)} finds {'none' if seen[0][0] is not None else 'another one'} there: --out must be "
                 f"on a filesystem every node shares (an absolute path on a shared mount), or the run would mix a "
                 f"restart with a fresh start")
    if mode == "false":
        if it is not None:
            print0(f"[{tag}] --resume false: starting over; the checkpoint at {ckpt} (iteration {it}) is discarded "
                   f"and replaced at the first save")
        return False
    if it is None:
        prev_it = checkpoint_iteration(prev)
        if prev_it is not None:       # left by an interrupted save, and recover_interrupted_save did not verify it
            fail(f"[{tag}] no checkpoint at {ckpt}; the previous one at {prev} (iteration {prev_it}) does not match its "
                 f"manifest: " + "; ".join(verify_checkpoint(prev)[:3]) + ". What to do: restore it from a copy, or "
                 f"start over with --resume false")
        if mode == "true":
            fail(f"--resume true: no checkpoint at {ckpt} to continue from (--resume auto starts fresh when there is none)")
        return False
    problems = [None]
    if dist.get_rank() == 0:
        problems[0] = verify_checkpoint(ckpt)
    dist.broadcast_object_list(problems, src=0)
    if problems[0]:
        prev_it = checkpoint_iteration(prev)
        fallback = (f"the previous checkpoint is kept at {prev} (iteration {prev_it}): move it to {ckpt} to resume "
                    f"from there, or " if prev_it is not None else "")
        fail(f"[{tag}] the checkpoint at {ckpt} is damaged and cannot be resumed: " + "; ".join(problems[0][:3])
             + f". What to do: {fallback}start over with --resume false.")
    if args is not None:
        check_resume_config(ckpt, args, tag)
    return True


def recover_interrupted_save(ckpt: Path, tag: str) -> None:
    """A save killed between atomic_dir_write's two renames leaves no <ckpt>, the replaced one as <ckpt>.prev (or
    .old) and the new one complete in <ckpt>.tmp. Rank 0 takes up the newest of them that verifies against its
    manifest, says so, and every rank waits for it; a partial .tmp (no manifest, or damaged) is never taken."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        if not ckpt.exists():
            candidates = []
            for suffix in (".tmp", ".prev", ".old"):
                c = ckpt.with_name(ckpt.name + suffix)
                it = checkpoint_iteration(c)
                if it is not None and not verify_checkpoint(c):
                    candidates.append((it, suffix != ".tmp", c))      # the newest; at a tie the just-written one
            if candidates:
                it, _, c = max(candidates)
                print0(f"[{tag}] no checkpoint at {ckpt}: the last save was interrupted between its two renames. "
                       f"{c} holds a complete checkpoint (iteration {it}, every file matches its manifest): taking it up")
                c.rename(ckpt)
                _fsync_path(ckpt.parent)
    if dist.is_initialized():
        dist.barrier()


def stop_if_finished(ckpt: Path, iterations: int | None, out: Path, tag: str, resume: str, args) -> None:
    """Every rank, after resume_from: a finished run leaves nothing to do. Say so and end the process with 0, changing
    no file (a shorter --iterations never truncates or rewrites a longer run). Finished: a checkpoint past --iterations
    (or at it, with the run's summary written), or a summary whose checkpoint was removed at the end
    (--keep-checkpoint false): then the command must be the run's own (its method and arguments, as
    check_resume_config asks of a checkpoint), and cannot train further. resume: --resume (false starts over: nothing
    is checked). iterations: None where the run's length is not a flag (01)."""
    it = checkpoint_iteration(ckpt)
    summary_file = out / "run_summary.json"
    if resume == "false" or (it is None and not summary_file.exists()):
        return
    if it is None:
        summary = read_json(summary_file)
        if summary.get("method") not in (None, tag):
            fail(f"[{tag}] {out} holds a finished {summary['method']} run, not a {tag} one: this command would mix two "
                 f"methods in one folder. What to do: give this run another --out.")
        changes = config_changes(summary.get("config") or {}, args)
        done = (summary.get("config") or {}).get("iterations")
        if changes or (iterations is not None and done is not None and iterations > done):
            fail(f"[{tag}] {out} holds a finished run, and its checkpoint was removed at its end (--keep-checkpoint "
                 f"false), so it cannot continue under this command:\n  " + "\n  ".join(
                     changes or [f"--iterations: {done} -> {iterations}"]) + f"\nWhat to do: another --out for a new run "
                 f"(or --resume false, which replaces this one); to extend a run, train it with --keep-checkpoint true.")
        print0(f"[{tag}] nothing to do: the run in {out} is finished (run_summary.json; its checkpoint was removed at "
               f"its end); every file in {out} is left as it was. For a new run, another --out.")
        teardown(0)
    if iterations is None or it < iterations or (it == iterations and not summary_file.exists()):
        return
    print0(f"[{tag}] nothing to do: the checkpoint at {ckpt} is at iteration {it}, "
           + (f"past --iterations {iterations}" if it > iterations else f"the end of --iterations {iterations}, and the "
              f"run is finished") + f"; every file in {out} is left as it was. To train further, give --iterations "
           f"above {it}; for a shorter run, another --out.")
    teardown(0)


def remove_checkpoint(ckpt: Path, keep: bool, tag: str) -> None:
    """Rank 0, once the run's final model and summary are written: the resume checkpoint (and the previous one) is
    removed, unless --keep-checkpoint; stop_if_finished then recognises the finished run by its summary."""
    if keep or not any(ckpt.with_name(ckpt.name + s).exists() for s in ("", ".prev", ".old", ".tmp")):
        return
    for suffix in (".tmp", ".old", ".prev", ""):           # the checkpoint itself last: a crash leaves a resumable one
        shutil.rmtree(ckpt.with_name(ckpt.name + suffix), ignore_errors=True)
    _fsync_path(ckpt.parent)
    print0(f"[{tag}] removed the resume checkpoint {ckpt} (the run is finished; --keep-checkpoint true keeps it)")


def load_rl_checkpoint(folder: Path, models: dict, optimizers: dict) -> dict:
    """Every rank: each model's weights and AdamW state, read shard by shard into this rank's shards (the models are
    built and sharded first, from pi_0; torch.distributed.checkpoint reshards a checkpoint written by another number
    of ranks), and this rank's RNG. Returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_json(folder / "trainer_state.json")
    flat, _ = _sharded_state(models, optimizers)
    try:
        dcp.load(flat, storage_reader=dcp.HuggingFaceStorageReader(str(folder / "shards")))
    except Exception as e:          # a checkpoint of another layout or model (the manifest verified its bytes)
        fail(f"cannot load the checkpoint {folder}: {type(e).__name__}: {str(e)[:300]}. Was it written for these models "
             f"and this version? Start over with --resume false, or give another --out")
    for n, m in models.items():
        set_model_state_dict(m, {k[len(f"{n}/model/"):]: v for k, v in flat.items() if k.startswith(f"{n}/model/")})
        if n in optimizers:
            osd = {}
            for k, v in flat.items():
                if k.startswith(f"{n}/optim/"):
                    fqn, name = k[len(f"{n}/optim/"):].rsplit("/", 1)
                    osd.setdefault(fqn, {})[name] = v
            set_optimizer_state_dict(m, optimizers[n], {"state": osd, "param_groups": state["param_groups"][n]})
    rng = read_safetensors(folder / "rng.safetensors")
    if state["world_size"] == dist.get_world_size():
        torch.set_rng_state(rng["cpu"][dist.get_rank()].clone())  # a fresh tensor: a view crashes it
        if torch.cuda.is_available() and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"][dist.get_rank()].clone())
    else:
        print0(f"[resume] the checkpoint was written by {state['world_size']} ranks, this run has "
               f"{dist.get_world_size()}. The run continues from iteration {state['iteration']} with the same "
               f"arguments, and what it computes per step is the same math (means over the batch and minibatch, one "
               f"aligner), but it will not repeat what an uninterrupted {state['world_size']}-rank run would have done: "
               f"(1) sampling: each rank's random stream restarts from --seed + 1 + rank, so other answers are drawn; "
               f"(2) minibatches: each is the next rows of every rank's share of the rollouts, so which rollouts share "
               f"a gradient step changes with the number of ranks. Both segments are recorded (run_summary.json, "
               f"'segments').")
    RUN_SEGMENTS[:] = state.get("segments") or [{"from_iteration": 0, "world_size": state["world_size"]}]
    if RUN_SEGMENTS[-1]["world_size"] != dist.get_world_size():
        RUN_SEGMENTS.append({"from_iteration": state["iteration"], "world_size": dist.get_world_size()})
    return state


RUN_SEGMENTS: list[dict] = []   # [{from_iteration, world_size}]: one per stretch of a run on one number of ranks


def run_segments() -> list[dict]:
    """This run's stretches by world size (a fresh run: one), for checkpoints and run_summary.json."""
    return list(RUN_SEGMENTS) or [{"from_iteration": 0, "world_size": dist.get_world_size() if dist.is_initialized() else 1}]


def lock_run_folder(out: Path, tag: str) -> None:
    """One writer per folder: rank 0 holds an exclusive kernel lock (flock) on <out>/.lock for the whole run, and
    writes its owner there (host, pid, start time) for the message a second run gets; every rank stops if it is held.

    The kernel drops the lock with the process however it ends (a crash, SIGKILL, a requeued container whose pid
    namespace is gone), so a dead run's lock is never in the way and a pid reused in another namespace is never taken
    for a live run. Across nodes it needs a filesystem whose flock reaches every node (NFSv4, Lustre mounted with
    -o flock, GPFS); docs/scale.md, "Several nodes", says so. A run starts here, so here a process that ran another
    stage before (a caller running stages' main() in one process) forgets that run's counts and segments.
    """
    import fcntl

    SKIPPED_ROWS.clear()
    RUN_SEGMENTS.clear()
    message = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock = out / ".lock"
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = json.loads(os.read(fd, 4096) or b"{}")
                except ValueError:
                    owner = {}
                os.close(fd)
                message[0] = (f"[{tag}] {out} is in use by another run (host {owner.get('host')}, pid "
                              f"{owner.get('pid')}, started {owner.get('started')}): two runs in one folder would mix "
                              f"their metrics and checkpoints. Wait for it, or use another --out.")
                break
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if not same:                     # its holder removed it as we opened it: lock the file there now
                os.close(fd)
                continue
            left = os.read(fd, 4096)
            if left.strip():                 # a run that ended without releasing it (killed, crashed, lost its node)
                print0(f"[{tag}] taking over {lock}: the run that left it is no longer running ({left.decode(errors='replace')})")
            me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
            _AT_TEARDOWN.append(lambda: (lock.unlink(missing_ok=True), os.close(fd)))   # unlocked with the unlink
            break
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if message[0]:
        fail(message[0])


def checkpoint_or_stop(done: int, total: int, save_every: int, stop: "StopRequest", device, save, tag: str, ckpt: Path,
                       close: list, unit: str = "iteration") -> None:
    """The end of every iteration (01: every step), a collective: save() a checkpoint every save_every, at the
    end, and when some rank got a stop signal; after a signal, close what is open (a progress bar, the metrics
    log), say how to continue, and end the process with 128 + the signal's number."""
    signum = stop.agreed(device)              # did any rank get SIGTERM / SIGUSR1 / Ctrl-C? (the same answer on all)
    if done % save_every == 0 or done == total or signum:
        save()
    if signum:
        for c in close:
            c.close()
        print0(f"[{tag}] stopped by signal {signum} after {unit} {done} of {total}: checkpoint written to {ckpt}. "
               f"Run the same command again to continue from there (--resume auto).")
        teardown(128 + signum)


# ---- 6. stop requests (preemption, Ctrl-C) and the non-finite guard
class StopRequest:
    """SIGTERM and SIGUSR1 (what cluster schedulers send before a preemption; torchrun forwards them to the
    workers), SIGHUP (the terminal that started the run closed) and SIGINT (Ctrl-C, which a terminal sends to torchrun and its workers alike) only set a flag. The
    loop asks at the end of every iteration whether any rank got one (one all-reduce), so every rank finishes the
    same iteration, a checkpoint is written, and the run exits. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.signum = 0
        for name in ("SIGTERM", "SIGUSR1", "SIGHUP", "SIGINT"):
            signal.signal(getattr(signal, name), self._set)

    def _set(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt
            if not dist.is_initialized() or dist.get_rank() == 0:
                print("\n[stop] Ctrl-C: finishing this iteration and writing a checkpoint (Ctrl-C again: stop now, "
                      "losing the work since the last checkpoint)", file=sys.stderr, flush=True)
        self.signum = signum

    def agreed(self, device) -> int:
        """A collective: the signal number that some rank received, 0 if none did."""
        t = torch.tensor([float(self.signum)], dtype=torch.float64, device=device)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())


def first_nonfinite(named: dict[str, torch.Tensor], device) -> str | None:
    """A collective: the first name whose value holds a NaN or inf on some rank, or None. Every rank gets the
    same answer (one all-reduce), so all skip or all take the optimizer step."""
    flags = torch.tensor([0.0 if bool(torch.isfinite(full_value(v).detach()).all()) else 1.0 for v in named.values()],
                         dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return next((name for name, f in zip(named, flags.tolist()) if f), None)


class NonFiniteGuard:
    """Owns an optimizer step: clip, check, step or skip, zero the gradients. A step whose loss, gradient or update
    is not finite on some rank is skipped on every rank (the weights and AdamW's moments never see it) and counted;
    after `limit` skipped steps in a row of one optimizer, the run stops, naming the first non-finite quantity."""

    def __init__(self, limit: int, tag: str, ckpt: Path):
        self.limit, self.tag, self.ckpt = limit, tag, ckpt
        self.skipped, self.streak, self.first, self.pending = Counter(), Counter(), {}, set()

    def check(self, what: str, named: dict[str, torch.Tensor], device, where: str) -> bool:
        """A collective: True when every value is finite on every rank; else `what`'s next step() is a skip."""
        bad = first_nonfinite(named, device)
        if bad is None:
            return True
        self.pending.add(what)
        self.first.setdefault(what, f"{bad} ({where})")
        return False

    def step(self, what: str, optimizer, model: torch.nn.Module, max_norm: float, named: dict[str, torch.Tensor],
             device, where: str) -> tuple[bool, float]:
        """Clip model's gradients to max_norm; take optimizer's step when named and the norm are finite on every
        rank (and no check() of this step failed), else skip it; zero the gradients. -> (whether the step was
        taken, the norm before clipping: NaN when an earlier check() failed and nothing was clipped)."""
        norm = torch.tensor(float("nan"))
        if what not in self.pending:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            self.check(what, {**named, f"the {what}'s gradient norm": norm}, device, where)
        taken = what not in self.pending
        if not taken:
            self.pending.discard(what)
            self.skipped[what] += 1
            self.streak[what] += 1
            if self.streak[what] >= self.limit:
                self._stop(what)
        else:
            optimizer.step()
            self.streak[what] = 0
            self.first.pop(what, None)
        optimizer.zero_grad(set_to_none=True)
        return taken, float(full_value(norm))

    def counts(self) -> dict:
        """The steps skipped so far, per optimizer, as metrics."""
        return {f"nonfinite/skipped_{w}_steps": self.skipped[w] for w in ("policy", "critic")}

    def _stop(self, what: str) -> NoReturn:
        it = checkpoint_iteration(self.ckpt)
        fail(f"[{self.tag}] stopped: {self.streak[what]} {what} optimizer steps in a row had non-finite numbers (each "
             f"was skipped, so no weight took them in). The first: {self.first[what]}. Nothing was saved since; "
             + (f"the last checkpoint, {self.ckpt} (iteration {it}), is untouched. " if it is not None else
                "there is no checkpoint yet. ")
             + "Find the source (a reward model returning inf or NaN, a learning rate too high, a bf16 "
               "overflow), fix it, and rerun the same command to continue (--max-nonfinite-steps sets the limit).")
