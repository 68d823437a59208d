"""How much of a training loop is the algorithm and how much bookkeeping.

    python bench/loop_lines.py 02_train_molma.py 03_train_baselines.py

Counts the code lines of a script's `for it in tqdm(...)` loop (comments and blank lines left out; a statement's
continuation lines count with it) and calls a statement bookkeeping when it times, logs, checkpoints, handles a stop
signal, collects statistics or names where a step is (the regular expression BOOK); the optimizer steps through the
guard (line 14 of Algorithm 1) count as the algorithm. A rough measure of how the loop reads, not a test.
"""
import re
import sys

BOOK = re.compile(r"clock\.|t[0-3] = time|steps = \[\]|steps\.append|where = |losses = |aligned|log_iteration|"
                  r"checkpoint_or_stop|metrics\.|signum|stop\.|print0|teardown|guard\.|finite|stats|rec\[|rec\.update|"
                  r"grams|norms|cos = |iu = |truth = |answers = |total = |critic_norm|\bnan\b|full_value|"
                  r"save_rl_checkpoint|sample_rows|iteration_metrics|amtl_balance\(gram\)")
STEP = re.compile(r"guard\.step|guard\.check")


def count(path: str) -> str:
    src = open(path).read().split("\n")
    start = next(i for i, l in enumerate(src) if re.match(r"\s*for it in tqdm", l))
    indent = len(src[start]) - len(src[start].lstrip())
    end = next(i for i in range(start + 1, len(src)) if src[i].strip() and not src[i].lstrip().startswith("#")
               and len(src[i]) - len(src[i].lstrip()) <= indent)
    statements, depth = [], 0
    for line in src[start:end]:
        if not line.strip() or line.strip().startswith("#"):
            continue
        if depth == 0:
            statements.append([])
        statements[-1].append(line)
        code = re.sub(r"#.*", "", re.sub(r"\"[^\"]*\"|'[^']*'", "", line))
        depth += sum(code.count(c) for c in "([{") - sum(code.count(c) for c in ")]}")
    book = sum(len(s) for s in statements if BOOK.search(" ".join(s)) and not STEP.search(" ".join(s)))
    code_lines = sum(len(s) for s in statements)
    return (f"{path}: the loop spans {end - start} lines, {code_lines} of code: algorithm {code_lines - book}, "
            f"bookkeeping {book}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(count(p))
