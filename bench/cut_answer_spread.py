"""How far down a fixed -1 puts a cut answer in so_weighted: the spread of its combined reward over pi_0's finished
answers. Not a test: a measurement (docs/design.md, "Answers cut at the length limit").

    python bench/cut_answer_spread.py --run runs/study

pi_0 (<run>/world/base) answers --batches batches of 64 training prompts, sampled as 02/03 sample; RMhelp and RMsafe
(<run>/rm_help, <run>/rm_safe) score them; Eq. 3.4 whitens each over the finished answers, and so_weighted's equal
weights combine them. One process. Prints the spread per batch, its mean, 1 / mean (how many deviations a fixed
-1 was) and the share of cut answers.
"""
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common as C  # noqa: E402
import bookkeeping as bk  # noqa: E402


@dataclass
class Args(bk.CheckedArgs):
    """The spread of so_weighted's reward over pi_0's finished answers."""
    run: str = bk.arg("runs/study", "a folder holding world/, rm_help/ and rm_safe/ (./run.sh study's, or runs/tiny)")
    batches: bk.Positive[int] = bk.arg(8, "batches of 64 prompts")
    seed: int = bk.arg(0, "seed")


def main():
    args = bk.parse_args(Args)
    C.set_seed(args.seed)
    root = Path(args.run)
    tok = bk.load_tokenizer(str(root / "world" / "base"))
    policy = C.load_causal_lm(str(root / "world" / "base"), tok)
    rms = [C.load_score_model(str(root / f"rm_{o}" / "model"), tok, "reward") for o in ("help", "safe")]
    prompts = [p for p, _ in C.load_rl_prompts("train", str(root / "world" / "data"), seed=args.seed)]
    sampling = SimpleNamespace(**{k: bk.RL_TINY[k] for k in ("max_prompt_len", "max_new_tokens")}, temperature=1.0,
                               prompt_template="phi2")
    spreads, cut = [], []
    for b in range(args.batches):
        r = C.generate_rollouts(policy, tok, prompts[b * 64 : (b + 1) * 64], sampling, "cpu")
        rm_mask = r.attention_mask.clone()                        # the answer without its EOS, as score_rollouts
        ended = r.ended.nonzero().squeeze(1)
        rm_mask[ended, r.prompt_len + r.mask[ended].sum(1).long() - 1] = 0
        with torch.no_grad():
            probs = torch.stack([torch.sigmoid(C.sequence_scores(m, r.sequences, rm_mask)[:, 0]) for m in rms], 1)
        reward = (C.logit_whiten(probs[r.ended]) * 0.5).sum(1)    # Eq. 4.1, equal weights, finished answers
        spreads.append(reward.std(correction=0).item())
        cut.append(1 - r.ended.float().mean().item())
    mean = sum(spreads) / len(spreads)
    print(f"so_weighted's reward spread per batch: {', '.join(f'{s:.3f}' for s in spreads)}; mean {mean:.3f} "
          f"({min(spreads):.2f}-{max(spreads):.2f}); a fixed -1 was {1 / mean:.2f} deviations down; "
          f"cut answers {sum(cut) / len(cut):.3f}")


if __name__ == "__main__":
    main()
