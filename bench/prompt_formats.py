"""What each --prompt-template gives a real instruct model: the EOS rate of sampled answers and one greedy answer.
Not a test: a measurement (docs/your_model.md).

    python bench/prompt_formats.py --policy runs/real/smollm2 --data-root runs/real/world/data

pi_0 answers the same test prompts in every format the project offers, sampled as the stages sample (temperature 1,
no top-k / top-p, --max-new-tokens); one process. Writes bench/results_prompt_formats.json.
"""
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402
import bookkeeping as bk  # noqa: E402


@dataclass
class Args(bk.CheckedArgs):
    """EOS rate and a greedy answer of pi_0 in each prompt format."""
    policy: str = bk.arg("runs/real/smollm2", "a causal-LM folder")
    data_root: str = bk.arg("runs/real/world/data", "where the test prompts are read")
    num_prompts: bk.Positive[int] = bk.arg(32, "test prompts")
    max_new_tokens: bk.Positive[int] = bk.arg(128, "answer length limit")
    seed: int = bk.arg(0, "seed")


def main():
    args = bk.parse_args(Args)
    prompts = [p for p, _ in C.load_rl_prompts("test", args.data_root, limit=args.num_prompts, seed=args.seed)]
    model = None
    results = {}
    for fmt in C.PROMPT_TEMPLATES:
        tok = bk.load_tokenizer(args.policy, fmt)
        model = model or C.load_causal_lm(args.policy, tok)
        ids, mask = C.encode_prompts(tok, prompts, 128, fmt)
        C.set_seed(args.seed)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                 max_new_tokens=args.max_new_tokens, pad_token_id=C._pad_id(tok),
                                 eos_token_id=tok.eos_token_id)
            greedy = model.generate(input_ids=ids[:1, -int(mask[0].sum()):], max_new_tokens=40, do_sample=False,
                                    pad_token_id=C._pad_id(tok), eos_token_id=tok.eos_token_id)
        answers = out[:, ids.shape[1]:]
        ended = ((answers == tok.eos_token_id) & C.response_mask(answers, tok.eos_token_id).bool()).any(1)
        results[fmt] = {"eos_rate": ended.float().mean().item(),
                        "greedy_prompt": C.prompt_text(tok, prompts[0], fmt),
                        "greedy_answer": tok.decode(greedy[0, int(mask[0].sum()):], skip_special_tokens=True)}
        print(f"{fmt:12s} EOS rate {results[fmt]['eos_rate']:.2f}; greedy on {prompts[0]!r}: "
              f"{results[fmt]['greedy_answer'][:160]!r}")
    out = Path(__file__).resolve().parent / "results_prompt_formats.json"
    out.write_text(json.dumps({"config": vars(args), "results": results}, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
