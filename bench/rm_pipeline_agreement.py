"""Does a saved reward model score the same in transformers' pipeline as in the project? Over 400 test answers:
the Pearson correlation, the pairwise order agreement and the largest difference of the two scores.

    python bench/rm_pipeline_agreement.py --rm runs/tiny/rm_safe/model --data-root runs/tiny/world/data --objective safe

--code points at another checkout of this project (to measure an older version's scoring against the pipeline).
"""
import argparse
import inspect
import itertools
import json
import sys
from pathlib import Path

import torch

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--rm", required=True, help="a reward-model folder (01's <out>/model)")
p.add_argument("--data-root", required=True, help="the world's data folder (its PKU-SafeRLHF test split is read)")
p.add_argument("--objective", default="safe", help="help or safe: whose test pairs give the answers")
p.add_argument("--code", default=str(Path(__file__).resolve().parent.parent), help="the project checkout whose common.py scores")
a = p.parse_args()
sys.path.insert(0, a.code)
import common as C  # noqa: E402
import bookkeeping as bk  # noqa: E402
from transformers import pipeline  # noqa: E402

tok = bk.load_tokenizer(a.rm)
model = C.load_score_model(a.rm, tok, "reward")
pairs = C.load_preference_pairs(a.objective, "test", a.data_root, limit=200, seed=0)
items = [(q.prompt, ans) for q in pairs for ans in (q.chosen, q.rejected)][:400]
pipe = pipeline("text-classification", model=a.rm, function_to_apply="none", top_k=None)
head = [v for _, v in sorted(model.config.id2label.items())].index(a.objective)
proj, pip = [], []
with torch.no_grad():
    for q, ans in items:
        pair = ([q], [ans], 512) + (("phi2",) if "template" in inspect.signature(C.encode_pairs).parameters else ())
        proj.append(C.sequence_scores(model, *C.encode_pairs(tok, *pair)[:2])[0, head].item())   # (older: no template)
        out = pipe(f"Instruct: {q}\nOutput: {ans}")                 # the README's text for the phi2 template
        pip.append({d["label"]: d["score"] for d in (out[0] if isinstance(out[0], list) else out)}[a.objective])
x, y = torch.tensor(proj), torch.tensor(pip)
order = [(x[i] > x[j]) == (y[i] > y[j]) for i, j in itertools.combinations(range(len(x)), 2)]
print(json.dumps({"code": a.code, "rm": a.rm, "answers": len(items), "pearson": round(torch.corrcoef(torch.stack([x, y]))[0, 1].item(), 4),
                  "order_agreement": round(sum(map(bool, order)) / len(order), 4), "max_abs_diff": round((x - y).abs().max().item(), 6)}))
