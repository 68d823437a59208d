"""Band A of common.py, copied out: each block's source (inspect.getsource of its functions and classes, the
source lines of its constants) run alone in a namespace that holds only torch, torch.distributed as dist, math and
standard-library modules, as a user's file would after `import torch` and the standard imports.

Used by tests/test_copy_out.py, in process, and as a torchrun worker for the FSDP block:
    torchrun --nproc_per_node=2 tests/copy_out.py fsdp
"""
import ast
import importlib
import inspect
import logging
import math
import os
import socket
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import common as C  # noqa: E402

# The blocks a user copies, in the order of common.py's band A (A1-A7); a block's pieces sit side by side there.
BLOCKS = {
    "ranking_loss (Eq. 3.2)": ["ranking_loss"],
    "sign_loss (safe-rlhf's cost model)": ["sign_loss"],
    "logit_whiten (Eq. 3.4)": ["logit_whiten"],
    "shape_finished (Eq. 3.4 over finished answers)": ["shape_finished"],
    "kl_penalized_rewards (Eq. 3.3)": ["kl_penalized_rewards"],
    "gae": ["gae"],
    "whiten_advantages": ["whiten_advantages"],
    "APA and value losses (Eq. 3.5-3.6)": ["_masked_token_mean", "apa_loss", "value_loss"],
    "AMTL aligner (Algorithm 1, lines 8-13)": ["amtl_balance", "amtl_align", "amtl_align_sharded",
                                               "amtl_align_representation", "condition_number"],
    "per-objective gradients (lines 4-7, 14)": ["_local", "objective_gradients", "set_flat_grad"],
    "FSDP2 setup and sharded loading": ["DistInfo", "setup_distributed", "watch_peers", "stop_when_the_launcher_dies", "_LOST_PEER",
                                        "_name_a_lost_peer", "_AT_TEARDOWN", "teardown", "decoder_layers",
                                        "shard_model", "load_sharded"],
}
STDLIB = {m.__name__: m for m in (os, sys, socket, logging, warnings, importlib, __import__("dataclasses"),
                                  __import__("signal"), __import__("datetime"), __import__("time"),
                                  __import__("multiprocessing"))}


def band_a_names() -> list[str]:
    """Every top-level name defined in band A of common.py, read from the file (between the A and B headers)."""
    src = Path(C.__file__).read_text()
    a, b = src.index("\n# ==== A. "), src.index("\n# ==== B. ")
    names = []
    for node in ast.parse(src).body:
        start = src.count("\n", 0, a) + 1 < node.lineno < src.count("\n", 0, b) + 1
        if start and isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif start and isinstance(node, (ast.Assign, ast.AnnAssign)):
            names.append((node.targets[0] if isinstance(node, ast.Assign) else node.target).id)
    return names


def source_of(name: str) -> str:
    """A function's or class's source by inspect.getsource; a constant's assignment as it stands in common.py."""
    obj = getattr(C, name)
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return inspect.getsource(obj)
    src = Path(C.__file__).read_text()
    for node in ast.parse(src).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and \
                (node.targets[0] if isinstance(node, ast.Assign) else node.target).id == name:
            return ast.get_source_segment(src, node) + "\n"
    raise KeyError(name)


def copied(block: str) -> dict:
    """Run the block's source alone (no `from __future__`, nothing of common.py) -> the namespace it defines."""
    text = "\n\n".join(source_of(n) for n in BLOCKS[block])
    ns = {"torch": torch, "dist": dist, "math": math, **STDLIB, "__name__": f"copied {block}"}
    exec(compile(text, f"<copied: {block}>", "exec", dont_inherit=True), ns)
    for n in BLOCKS[block]:
        assert n in ns, f"{block}: {n} not defined by its own source"
    return ns


def check_fsdp(world_size_expected: int) -> None:
    """Under torchrun: the copied block joins the group, loads a model into FSDP2 shards, and its forward equals
    common.py's load_sharded's; then the copied teardown ends the process with its code."""
    from transformers import PhiConfig, PhiForCausalLM

    ns = copied("FSDP2 setup and sharded loading")
    info = ns["setup_distributed"]()
    assert info.world_size == world_size_expected and dist.is_initialized()

    def build():
        torch.manual_seed(0)
        cfg = PhiConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, eos_token_id=0)
        return PhiForCausalLM(cfg).eval()

    mine = ns["load_sharded"](build, info)
    theirs = C.load_sharded(build, C.DistInfo(info.rank, info.world_size, info.local_rank, info.device))
    ids = torch.arange(1, 13).view(2, 6) % 50
    with torch.no_grad():
        a, b = mine(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert torch.equal(a, b), (a - b).abs().max()
    if info.rank == 0:
        print(f"fsdp block OK (world size {info.world_size})", flush=True)
    ns["teardown"](7)                         # the copied teardown: its exit code is the process's


if __name__ == "__main__":
    assert sys.argv[1] == "fsdp"
    check_fsdp(int(os.environ["WORLD_SIZE"]))
